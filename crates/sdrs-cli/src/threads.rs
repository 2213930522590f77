//! One compute thread per physical core: the matrix kernels keep a core's vector units busy,
//! so a second hyper-thread on the same core only adds contention (PyTorch's default too).

/// Sizes the thread pools (rayon's, which our kernels use, and candle's, which reads
/// `RAYON_NUM_THREADS`) to the physical cores, unless `RAYON_NUM_THREADS` already says.
/// Call first thing in `main`, before any thread exists.
pub fn use_physical_cores() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let cores = num_cpus::get_physical();
    // Edition 2021: setting the environment is safe; nothing else runs yet.
    std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    // The pool may only be configured once; an error means someone already did.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(cores)
        .build_global();
}
