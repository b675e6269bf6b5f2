//! What an operator relies on around the contract: systemd's notify protocol and watchdog,
//! the Grafana dashboard's metrics on a live relay, and secrets that never get printed.

mod support;

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;

/// Collects systemd notifications sent to a socket of the test's own.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
    /// Every message received, with when it arrived.
    received: Vec<(Instant, String)>,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        NotifySocket {
            socket,
            path,
            _dir: dir,
            received: Vec::new(),
        }
    }

    /// Reads what has arrived so far.
    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.received.push((Instant::now(), text));
        }
    }

    /// Waits until a message equal to `state` arrives after `since`; returns when.
    fn wait_for(&mut self, state: &str, since: Instant, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            if let Some((at, _)) = self
                .received
                .iter()
                .find(|(at, m)| *at >= since && m.lines().any(|l| l == state))
            {
                return *at;
            }
            assert!(
                Instant::now() < deadline,
                "no {state} within {timeout:?}; received {:?}",
                self.received
            );
        }
    }

    fn last(&self, state: &str) -> Option<Instant> {
        self.received
            .iter()
            .rev()
            .find(|(_, m)| m.lines().any(|l| l == state))
            .map(|(at, _)| *at)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_watchdog_and_stopping_and_a_wedged_loop_loses_its_watchdog() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    create_topic(&bootstrap, &format!("{prefix}.sd"), 3).await;
    let mut notify = NotifySocket::bind();
    let started = Instant::now();
    // WATCHDOG_PID must name the relay itself: `exec` keeps the shell's pid.
    let mut child = relay_shell(&db.url, &bootstrap)
        .env(
            "OUTBOX_RELAY_RELAY__TOPIC_TEMPLATE",
            format!("{prefix}.{{aggregate_type}}"),
        )
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "1000000")
        .env("RELAY", relay_bin())
        .args(["-c", "WATCHDOG_PID=$$ exec \"$RELAY\" run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    notify.wait_for("READY=1", started, CONDITION_TIMEOUT);
    let first_ping = notify.wait_for("WATCHDOG=1", started, CONDITION_TIMEOUT);
    notify.wait_for(
        "WATCHDOG=1",
        first_ping + Duration::from_millis(1),
        CONDITION_TIMEOUT,
    );
    db.insert(&stream("sd", 5, 50)).await;
    wait_for("rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 50
    })
    .await;

    // Wedge the loop: its next read waits on a lock for longer than the watchdog interval.
    let wedge = db.lock_table("outbox", "ACCESS EXCLUSIVE").await;
    let wedged_at = Instant::now();
    let deadline = wedged_at + CONDITION_TIMEOUT;
    loop {
        notify.drain();
        let last_ping = notify.last("WATCHDOG=1").unwrap_or(started);
        if last_ping.elapsed() > Duration::from_millis(2500) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the watchdog kept being pinged while the loop was wedged"
        );
    }
    wedge.rollback().await.unwrap();
    let unwedged_at = Instant::now();
    notify.wait_for("WATCHDOG=1", unwedged_at, CONDITION_TIMEOUT);

    signal(child.id(), libc::SIGTERM);
    notify.wait_for("STOPPING=1", unwedged_at, CONDITION_TIMEOUT);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(30)).code(),
        Some(0)
    );
}

/// Every `outbox_relay_*` series a dashboard query names, from the dashboard JSON.
fn dashboard_series(dashboard: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = dashboard.as_bytes();
    let mut from = 0;
    while let Some(at) = dashboard[from..].find("outbox_relay_") {
        let start = from + at;
        let end = bytes[start..]
            .iter()
            .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
            .map_or(bytes.len(), |n| start + n);
        names.insert(dashboard[start..end].to_string());
        from = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_on_the_grafana_dashboard_is_exported_by_a_live_relay() {
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/outbox-relay.json"),
    )
    .expect("deploy/grafana/outbox-relay.json");
    let wanted = dashboard_series(&dashboard);
    assert!(wanted.len() >= 10, "the dashboard names only {wanted:?}");

    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    create_topic(&bootstrap, &format!("{prefix}.dash"), 3).await;
    db.insert(&stream("dash", 10, 200)).await;
    let relay = RunningRelay::start(template_settings(
        &db,
        &bootstrap,
        &prefix,
        "stats_interval = \"100ms\"\n[kafka.properties]\n\"statistics.interval.ms\" = 100\n",
    ))
    .await;
    wait_for("rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 200
    })
    .await;
    // librdkafka statistics arrive on their own schedule: wait for the first.
    wait_for_metric(relay.http_addr, "outbox_relay_broker_rtt_avg_seconds").await;
    let (_, metrics) = http_get(relay.http_addr, "/metrics").await;
    relay.stop().await;

    let exported: BTreeSet<String> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    let missing: Vec<&String> = wanted.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "dashboard metrics the relay does not export: {missing:?}\n{metrics}"
    );
}

/// A liveness probe restarts a wedged relay: `/healthz` fails once the loop has been stuck
/// in one step for `relay.liveness_timeout`, and answers again once it moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_while_the_relay_loop_is_wedged_and_recovers() {
    let db = TestDb::new().await;
    let bootstrap = kafka_bootstrap();
    let prefix = unique_prefix();
    create_topic(&bootstrap, &format!("{prefix}.live"), 3).await;
    let relay = RunningRelay::start(template_settings(
        &db,
        &bootstrap,
        &prefix,
        "liveness_timeout = \"2s\"\npoll_interval = \"100ms\"\n",
    ))
    .await;
    db.insert(&stream("live", 5, 50)).await;
    wait_for("rows marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 50
    })
    .await;
    assert_eq!(http_get(relay.http_addr, "/healthz").await.0, 200);

    // The relay's next read waits on this lock: one step that does not move.
    let wedge = db.lock_table("outbox", "ACCESS EXCLUSIVE").await;
    wait_for("/healthz fails", CONDITION_TIMEOUT, || async {
        let (status, body) = http_get(relay.http_addr, "/healthz").await;
        status == 503 && body.contains("relay.liveness_timeout")
    })
    .await;

    wedge.rollback().await.unwrap();
    wait_for("/healthz answers again", CONDITION_TIMEOUT, || async {
        http_get(relay.http_addr, "/healthz").await.0 == 200
    })
    .await;
    db.insert(&stream("live", 5, 20)).await;
    wait_for("rows after the wedge marked", CONDITION_TIMEOUT, || async {
        db.sent().await == 70
    })
    .await;
    relay.stop().await;
}

/// The deployment check judges configuration with the relay itself (`check --config-only`):
/// durations the relay reads (`1min`, `2d`) pass, a misspelt key is refused naming it, and
/// Kubernetes' service-link variables are no reason to refuse anything.
#[test]
fn the_deployment_check_judges_configuration_with_the_relay_itself() {
    let cache = std::env::var("OUTBOX_RELAY_CACHE")
        .unwrap_or_else(|_| format!("{}/.cache/outbox-relay", std::env::var("HOME").unwrap()));
    let python = format!("{cache}/venv/bin/python");
    assert!(
        std::path::Path::new(&python).exists(),
        "{python} is missing: scripts/test.sh runs scripts/check-deploy.sh first, which makes it"
    );
    let dir = tempfile::tempdir().unwrap();
    let check = |lines: &str| {
        let file = dir.path().join("relay.env");
        std::fs::write(&file, lines).unwrap();
        let output = std::process::Command::new(&python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/check_deploy.py"
            ))
            .arg("envfile")
            .arg(&file)
            .env("OUTBOX_RELAY_BIN", relay_bin())
            .output()
            .unwrap();
        (output.status.code(), output_text(&output))
    };
    let url = "OUTBOX_RELAY_DATABASE__URL=postgres://relay@127.0.0.1/app\n";
    let (code, text) = check(&format!(
        "{url}OUTBOX_RELAY_RELAY__DRAIN_TIMEOUT=1min\nOUTBOX_RELAY_RELAY__RETAIN_SENT=2d\nOUTBOX_RELAY_PORT=tcp://10.0.0.7:9743\n"
    ));
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = check(&format!("{url}OUTBOX_RELAY_RELAY__BATCH_SISE=10\n"));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("relay.batch_sise"), "{text}");
}
