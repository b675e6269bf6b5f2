//! Child processes and waiting: services spawned here die with the test binary
//! (PR_SET_PDEATHSIG from a thread that lives as long as the process), and every wait for a
//! condition fails the test after a bound instead of hanging.

use std::net::TcpListener as StdTcpListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

/// How long any condition may take before a test fails.
pub const CONDITION_TIMEOUT: Duration = Duration::from_secs(60);

/// Spawns `command` so that it is killed when the test process exits, even if the test
/// panics: PR_SET_PDEATHSIG is tied to the spawning thread, so spawn from a thread that
/// never exits.
pub(super) fn spawn_tied_to_process(mut command: Command, run_as: Option<(u32, u32)>) -> Child {
    static SPAWNER: OnceLock<std::sync::Mutex<std_mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    type SpawnRequest = (
        Command,
        Option<(u32, u32)>,
        std_mpsc::Sender<std::io::Result<Child>>,
    );
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<SpawnRequest>();
        std::thread::spawn(move || {
            for (mut command, run_as, reply) in rx {
                unsafe {
                    command.pre_exec(move || {
                        if let Some((uid, gid)) = run_as {
                            if libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                        }
                        // After setuid: a credential change clears the death signal.
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let _ = reply.send(command.spawn());
            }
            // The channel lives in a static, so this thread (and the death signal's
            // anchor) lasts as long as the process.
        });
        std::sync::Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = std_mpsc::channel();
    command.stdin(Stdio::null());
    spawner
        .lock()
        .unwrap()
        .send((command, run_as, reply_tx))
        .unwrap();
    reply_rx.recv().unwrap().expect("spawn service process")
}

pub fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The blocking twin of [`wait_for`], for starting services outside the async runtime.
pub(super) fn wait_for_blocking(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {CONDITION_TIMEOUT:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Waits for `condition` to hold, checking every 50 ms, failing after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn signal(pid: u32, sig: i32) {
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

pub fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Waits for a child to exit, failing the test after `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the relay did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
