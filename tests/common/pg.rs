//! Test support shared by the in-crate transcript tests and the integration tests: a real
//! PostgreSQL server in a temporary directory on a free loopback port (initdb + pg_ctl, run as
//! the `postgres` user when the tests run as root).
//! Needs the server binaries (`scripts/ensure-postgres` installs them); without them a test
//! fails with that instruction rather than skipping.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use super::TempDir;

/// A PostgreSQL server in a temporary directory, stopped and removed on drop.
pub struct PgServer {
    bin: PathBuf,
    root: TempDir,
    port: u16,
    /// Running as root: the server must run as the `postgres` user.
    as_postgres: bool,
}

impl PgServer {
    /// initdb + start, on a free loopback port.
    pub fn start() -> PgServer {
        let bin = pg_bin();
        let root = TempDir::new("pg");
        let as_postgres = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if as_postgres {
            let st = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&root.0)
                .status()
                .unwrap();
            assert!(st.success(), "chown of the PostgreSQL temp dir failed");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = PgServer {
            bin,
            root,
            port,
            as_postgres,
        };
        let data = server.data();
        server.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        server.pg_ctl_start();
        server
    }

    pub fn data(&self) -> PathBuf {
        self.root.0.join("data")
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn pg_ctl_start(&self) {
        let opts = format!(
            "-k {} -c listen_addresses=127.0.0.1 -p {} -c fsync=off",
            self.root.0.display(),
            self.port
        );
        let data = self.data();
        let log = self.root.0.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "start",
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "30",
                "-o",
                &opts,
            ],
        );
    }

    pub fn pg_ctl_stop(&self, mode: &str) -> bool {
        let data = self.data();
        self.try_run(
            "pg_ctl",
            &[
                "stop",
                "-D",
                data.to_str().unwrap(),
                "-m",
                mode,
                "-w",
                "-t",
                "30",
            ],
        )
        .status
        .success()
    }

    pub fn try_run(&self, tool: &str, args: &[&str]) -> std::process::Output {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        cmd.args(args).output().unwrap()
    }

    pub fn run(&self, tool: &str, args: &[&str]) {
        let out = self.try_run(tool, args);
        let log = std::fs::read_to_string(self.root.0.join("server.log")).unwrap_or_default();
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}\n{}\nserver log:\n{log}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Stop before the TempDir field removes the data directory.
        self.pg_ctl_stop("immediate");
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb`; the test fails (it does
/// not skip) when there is none.
pub fn pg_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let v: u32 = e.file_name().to_str()?.parse().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").exists().then_some((v, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): \
             run scripts/ensure-postgres"
        ),
    }
}
