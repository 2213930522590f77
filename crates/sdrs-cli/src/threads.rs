//! One compute thread per physical core: the matrix kernels keep a core's vector units busy,
//! so a second hyper-thread on the same core only adds contention (PyTorch's default too).

use std::collections::BTreeSet;

/// Sizes the thread pools (rayon's, which our kernels use, and candle's, which reads
/// `RAYON_NUM_THREADS`) to the physical cores, unless `RAYON_NUM_THREADS` already says.
/// Call first thing in `main`, before any thread exists.
pub fn use_physical_cores() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let Some(cores) = physical_cores() else {
        return;
    };
    // Edition 2021: setting the environment is safe; nothing else runs yet.
    std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    // The pool may only be configured once; an error means someone already did.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(cores)
        .build_global();
}

/// The number of physical cores (Linux: distinct sibling sets of the online CPUs).
fn physical_cores() -> Option<usize> {
    let cpus = std::fs::read_dir("/sys/devices/system/cpu").ok()?;
    let siblings: Vec<String> = cpus
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix("cpu")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| {
            std::fs::read_to_string(e.path().join("topology/thread_siblings_list")).ok()
        })
        .collect();
    count_cores(&siblings)
}

/// Distinct sibling lists ("0,8", "0-1", …), one per core; `None` when there are none.
fn count_cores(siblings: &[String]) -> Option<usize> {
    let distinct: BTreeSet<&str> = siblings.iter().map(|s| s.trim()).collect();
    (!distinct.is_empty()).then_some(distinct.len())
}

#[cfg(test)]
mod tests {
    use super::count_cores;

    fn lists(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn hyper_threads_of_one_core_count_once() {
        // 4 cores with 2 threads each, listed per logical CPU.
        let smt = lists(&[
            "0,4\n", "1,5\n", "2,6\n", "3,7\n", "0,4\n", "1,5\n", "2,6\n", "3,7\n",
        ]);
        assert_eq!(count_cores(&smt), Some(4));
        assert_eq!(count_cores(&lists(&["0-1", "0-1"])), Some(1));
        assert_eq!(count_cores(&lists(&["0", "1"])), Some(2));
        assert_eq!(count_cores(&[]), None);
    }
}
