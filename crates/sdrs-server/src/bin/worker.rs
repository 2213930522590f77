//! The worker process on its own, for the crate's tests (`sdrs serve` starts `sdrs
//! serve-worker`, the same code, instead).

fn main() -> std::process::ExitCode {
    match sdrs_server::run_worker() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sdrs worker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
