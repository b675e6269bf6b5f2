//! TLS for tests: a throwaway certificate authority and server certificate, and a TLS proxy
//! in front of a plaintext port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::process::{port_open, spawn_tied_to_process, wait_for_blocking};

/// A throwaway certificate authority and a server certificate for `localhost` and
/// 127.0.0.1, made with the `openssl` command: `ca.crt`, `server.crt`, `server.key`, and
/// `server.pem` (certificate and key in one file).
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    pub fn generate(dir: &Path) -> Certs {
        let run = |args: &[&str]| {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("the openssl command (apt-get install openssl)");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let days = ["-days", "2"];
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=outbox-relay test CA",
            days[0],
            days[1],
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            dir.join("san.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-extfile",
            "san.cnf",
            days[0],
            days[1],
        ]);
        let pem = [
            std::fs::read(dir.join("server.crt")).unwrap(),
            std::fs::read(dir.join("server.key")).unwrap(),
        ]
        .concat();
        std::fs::write(dir.join("server.pem"), pem).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for key in ["server.key", "server.pem", "ca.key"] {
            std::fs::set_permissions(dir.join(key), std::fs::Permissions::from_mode(0o600))
                .unwrap();
        }
        Certs {
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// TLS in front of a plaintext port (socat), for brokers that cannot serve TLS themselves.
pub struct TlsProxy {
    pub port: u16,
    child: Child,
}

impl TlsProxy {
    pub fn start(port: u16, target_port: u16, certs: &Certs) -> TlsProxy {
        let mut command = Command::new("socat");
        command
            .arg(format!(
                "openssl-listen:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={}",
                certs.path("server.pem")
            ))
            .arg(format!("tcp:127.0.0.1:{target_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = spawn_tied_to_process(command, None);
        wait_for_blocking(&format!("socat to listen on port {port}"), || {
            port_open(port)
        });
        TlsProxy { port, child }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
