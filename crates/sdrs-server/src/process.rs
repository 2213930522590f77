//! A worker process as the server sees it: started with its pipes, fed frames by a writer
//! thread of its own, its stderr relayed, and — when it dies — reaped and its end put in
//! words.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::protocol::{read_frame, write_frame, FromWorker, ToWorker};

/// How to start a worker process: `sdrs serve-worker`, or the crate's `sdrs-server-worker`.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Extra environment variables (tests arm the worker's crash hooks with one).
    pub env: Vec<(OsString, OsString)>,
}

impl WorkerCommand {
    pub fn new(program: impl Into<PathBuf>, args: &[&str]) -> Self {
        Self {
            program: program.into(),
            args: args.iter().map(OsString::from).collect(),
            env: Vec::new(),
        }
    }
}

/// A running worker process.
pub struct Process {
    child: Child,
    pid: u32,
    /// Frames for the worker's stdin, written by a thread of their own so that no caller
    /// ever blocks on the pipe.
    input: mpsc::Sender<(ToWorker, Vec<u8>)>,
    output: BufReader<ChildStdout>,
    /// The last fatal line the worker wrote on stderr ("has overflowed its stack", …).
    last_words: Arc<Mutex<Option<String>>>,
    /// Disconnected once the stderr relay has read everything the worker wrote.
    relayed: mpsc::Receiver<()>,
    /// The number of `POST /sdapi/v1/refresh-loras` this worker has been told of.
    pub addon_scans: u64,
}

/// How long a worker that closed its output gets to exit before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

impl Process {
    /// Starts a worker and gives it `setup` (the `Setup` message); ready when this returns.
    pub fn start(command: &WorkerCommand, setup: &ToWorker) -> Result<Self, String> {
        let program = command.program.display();
        let mut child = Command::new(&command.program)
            .args(&command.args)
            // Errors carry their message only: no backtrace is captured, whatever
            // RUST_BACKTRACE says (panics still print theirs on stderr).
            .env("RUST_LIB_BACKTRACE", "0")
            // The crash hooks are armed only by a command built to arm them (tests).
            .env_remove(crate::worker::TEST_CRASH_VAR)
            .envs(command.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the worker process {program}: {e}"))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("the worker process has no pipes".into());
        };
        let (input, frames) = mpsc::channel::<(ToWorker, Vec<u8>)>();
        let last_words = Arc::new(Mutex::new(None));
        let (relaying, relayed) = mpsc::channel::<()>();
        let threads = std::thread::Builder::new()
            .name("sdrs-worker-stdin".into())
            .spawn(move || write_frames(stdin, &frames))
            .and_then(|_| {
                let last_words = last_words.clone();
                std::thread::Builder::new()
                    .name("sdrs-worker-stderr".into())
                    .spawn(move || {
                        relay_stderr(stderr, &last_words);
                        drop(relaying);
                    })
            });
        if let Err(e) = threads {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("cannot start the worker's threads: {e}"));
        }
        let mut process = Process {
            pid: child.id(),
            child,
            input,
            output: BufReader::new(stdout),
            last_words,
            relayed,
            addon_scans: 0,
        };
        process.send(setup.clone(), Vec::new());
        match process.read() {
            Some((FromWorker::Ready { pid }, _)) => {
                process.pid = pid;
                eprintln!("sdrs: worker process {pid} started");
                Ok(process)
            }
            _ => Err(format!(
                "the worker process ({program}) {} before it was ready",
                process.reap()
            )),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Queues a frame for the worker's stdin (never blocks; a dead worker's frames are lost).
    pub fn send(&self, message: ToWorker, data: Vec<u8>) {
        let _ = self.input.send((message, data));
    }

    /// A sender for frames, for a job's interrupts and skips.
    pub fn sender(&self) -> mpsc::Sender<(ToWorker, Vec<u8>)> {
        self.input.clone()
    }

    /// The worker's next frame; `None` when it closed its output or broke the protocol.
    pub fn read(&mut self) -> Option<(FromWorker, Vec<u8>)> {
        read_frame(&mut self.output).ok().flatten()
    }

    /// Whether the process has ended (or cannot be asked).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Forgets the dying words of earlier jobs: they belong to the job that dies.
    pub fn forget_last_words(&self) {
        self.last_words
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// The worker broke off: waits for it to exit (killing it if it does not) and says why.
    pub fn reap(&mut self) -> String {
        let deadline = Instant::now() + EXIT_GRACE;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                _ => {
                    // Alive but no longer talking (or unwaitable): it cannot be trusted.
                    let _ = self.child.kill();
                    break self.child.wait().ok();
                }
            }
        };
        // The stderr relay may still be reading the dying words (a grandchild holding the
        // pipe open must not hold us up for long).
        let _ = self.relayed.recv_timeout(Duration::from_millis(200));
        let mut why = status.map_or_else(|| "vanished".to_string(), describe);
        let last = self
            .last_words
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(last) = last {
            why.push_str(&format!(", saying {last:?}"));
        }
        why
    }

    /// Closes the worker's input (it ends after its job) and waits a little for it.
    pub fn stop(self) {
        let Process {
            mut child, input, ..
        } = self;
        drop(input);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A worker's end in words: "was killed by signal 9 (SIGKILL: …)" or "exited with status 3".
pub fn describe(status: ExitStatus) -> String {
    if let Some(signal) = status.signal() {
        let (name, hint) = match signal {
            libc::SIGKILL => (
                "SIGKILL",
                ": out of memory (the kernel's OOM killer), or killed",
            ),
            libc::SIGABRT => ("SIGABRT", ": an abort, such as a failed allocation"),
            libc::SIGSEGV => ("SIGSEGV", ": a crash"),
            libc::SIGBUS => (
                "SIGBUS",
                ": a mapped file, such as a model, shrank under it",
            ),
            libc::SIGILL => ("SIGILL", ": an instruction this CPU lacks, or a crash"),
            libc::SIGFPE => ("SIGFPE", ""),
            libc::SIGTERM => ("SIGTERM", ""),
            libc::SIGINT => ("SIGINT", ""),
            libc::SIGHUP => ("SIGHUP", ""),
            libc::SIGPIPE => ("SIGPIPE", ""),
            libc::SIGXCPU => ("SIGXCPU", ": over its CPU time limit"),
            _ => ("", ""),
        };
        return if name.is_empty() {
            format!("was killed by signal {signal}")
        } else {
            format!("was killed by signal {signal} ({name}{hint})")
        };
    }
    match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => format!("ended ({status})"),
    }
}

/// The worker's stdin: frames from the channel until it closes or the pipe breaks.
fn write_frames(stdin: impl Write, frames: &mpsc::Receiver<(ToWorker, Vec<u8>)>) {
    let mut stdin = std::io::BufWriter::new(stdin);
    while let Ok((message, data)) = frames.recv() {
        if write_frame(&mut stdin, &message, &data).is_err() {
            return;
        }
    }
}

/// Copies the worker's stderr to ours, line by line, and keeps the last line that says why
/// a process dies.
fn relay_stderr(stderr: impl Read, last_words: &Mutex<Option<String>>) {
    const FATAL: [&str; 4] = [
        "has overflowed its stack",
        "memory allocation of",
        "fatal runtime error",
        "panicked while",
    ];
    let mut lines = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Lines are cut at 4 KiB so that a worker printing without newlines costs nothing.
        match lines.by_ref().take(4096).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if text.is_empty() {
            continue;
        }
        eprintln!("sdrs worker: {text}");
        if FATAL.iter().any(|f| text.contains(f)) {
            let mut kept: String = text.chars().take(300).collect();
            if let Some(at) = kept.find(", aborting") {
                kept.truncate(at);
            }
            *last_words.lock().unwrap_or_else(PoisonError::into_inner) = Some(kept);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deaths_are_described_by_signal_name_or_exit_status() {
        let killed = ExitStatus::from_raw(libc::SIGKILL);
        assert!(
            describe(killed).contains("signal 9 (SIGKILL"),
            "{}",
            describe(killed)
        );
        let exited = ExitStatus::from_raw(3 << 8);
        assert_eq!(describe(exited), "exited with status 3");
        let odd = ExitStatus::from_raw(40);
        assert_eq!(describe(odd), "was killed by signal 40");
    }
}
