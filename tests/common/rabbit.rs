//! A private RabbitMQ node per test: Debian's rabbitmq-server started without systemd, on free
//! loopback ports, with its own HOME (Erlang cookie), mnesia and logs in the test's directory;
//! killed (with its epmd) when dropped.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::{free_port, skip, wait_child};

pub const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
pub const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

pub struct Rabbit {
    pub dir: PathBuf,
    pub port: u16,
    /// The TLS listener's port, when started with [`Rabbit::start_tls`].
    pub tls_port: Option<u16>,
    pub node: String,
    epmd_port: u16,
    dist_port: u16,
    child: Option<Child>,
    extra: String,
}

impl Rabbit {
    /// RabbitMQ is installed (scripts/deps installs it), else the test is skipped (a failure
    /// under CI).
    pub fn available(test: &str) -> bool {
        let ok = Path::new(SERVER).exists()
            && Command::new("php")
                .args(["-r", "exit(class_exists('AMQPConnection') ? 0 : 1);"])
                .status()
                .is_ok_and(|s| s.success())
            && Command::new("/usr/bin/python3")
                .args(["-c", "import pika"])
                .status()
                .is_ok_and(|s| s.success());
        if !ok {
            skip(
                test,
                "rabbitmq-server, php-amqp or python3-pika missing (scripts/deps installs them)",
            );
        }
        ok
    }

    /// A node with `extra` lines in its rabbitmq.conf.
    pub fn start(dir: &Path, extra: &str) -> Rabbit {
        let mut r = Rabbit {
            dir: dir.join(format!("rabbit-{}", free_port())),
            port: free_port(),
            tls_port: None,
            node: String::new(),
            epmd_port: free_port(),
            dist_port: free_port(),
            child: None,
            extra: extra.to_string(),
        };
        r.node = format!("gs{}@localhost", r.port);
        r.boot();
        r
    }

    /// A node that also listens for TLS with `cert`, `key` and `ca` (PEM files).
    pub fn start_tls(dir: &Path, cert: &Path, key: &Path, ca: &Path) -> Rabbit {
        Rabbit::start_tls_verifying(dir, cert, key, ca, false)
    }

    /// [`Rabbit::start_tls`]; with `clients`, a client must show a certificate `ca` signed.
    pub fn start_tls_verifying(
        dir: &Path,
        cert: &Path,
        key: &Path,
        ca: &Path,
        clients: bool,
    ) -> Rabbit {
        let tls_port = free_port();
        let (verify, require) = if clients {
            ("verify_peer", "true")
        } else {
            ("verify_none", "false")
        };
        let extra = format!(
            "listeners.ssl.default = 127.0.0.1:{tls_port}\nssl_options.cacertfile = {}\nssl_options.certfile = {}\nssl_options.keyfile = {}\nssl_options.verify = {verify}\nssl_options.fail_if_no_peer_cert = {require}\n",
            ca.display(),
            cert.display(),
            key.display()
        );
        let mut r = Rabbit::start(dir, &extra);
        r.tls_port = Some(tls_port);
        r
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("HOME", &self.dir)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.dir.join("plugins"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq"));
    }

    /// Starts the node (again, on the same ports and data after [`Rabbit::kill`]) and waits
    /// until it takes AMQP connections (60 s at most).
    pub fn boot(&mut self) {
        fs::create_dir_all(&self.dir).unwrap();
        fs::write(self.dir.join("plugins"), "[].\n").unwrap();
        fs::write(
            self.dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{}\nloopback_users = none\n{}",
                self.port, self.extra
            ),
        )
        .unwrap();
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("out.log"))
            .unwrap();
        let mut cmd = Command::new(SERVER);
        self.env(&mut cmd);
        use std::os::unix::process::CommandExt;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0);
        self.child = Some(cmd.spawn().expect("rabbitmq-server"));
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if self.answers() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "RabbitMQ did not start within 60 s; see {}",
            self.dir.join("out.log").display()
        );
    }

    /// The node answers an AMQP protocol header with connection.start.
    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
        let mut frame = [0u8; 8];
        c.write_all(b"AMQP\0\0\x09\x01").is_ok()
            && c.read_exact(&mut frame).is_ok()
            && frame[0] == 1
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Kills the node at once (SIGKILL to its process group), like a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = killpg(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = wait_child(&mut c, Duration::from_secs(10));
        }
    }

    /// Stops (`frozen`) or continues the node's processes (SIGSTOP / SIGCONT to its process
    /// group): a broker that holds its connections open and answers nothing.
    pub fn freeze(&self, frozen: bool) {
        if let Some(c) = &self.child {
            let sig = if frozen {
                Signal::SIGSTOP
            } else {
                Signal::SIGCONT
            };
            let _ = killpg(Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// `rabbitmqctl` against this node.
    pub fn ctl(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(CTL);
        self.env(&mut cmd);
        let out = cmd.arg("-n").arg(&self.node).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Messages ready and unacknowledged in `queue`.
    pub fn depth(&self, queue: &str) -> (u64, u64) {
        let text = self.ctl(&[
            "-q",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ]);
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() == 3 && f[0] == queue {
                return (f[1].parse().unwrap_or(0), f[2].parse().unwrap_or(0));
            }
        }
        (0, 0)
    }
}

impl Drop for Rabbit {
    /// Kills the node, then its epmd (a daemon outside the node's process group). epmd refuses
    /// `-kill` while it still lists the node, which it drops only once it notices the killed
    /// node's connection closed: asked again for up to 2 s.
    fn drop(&mut self) {
        self.kill();
        let port = self.epmd_port.to_string();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let killed = Command::new("epmd")
                .args(["-port", &port, "-kill"])
                .stderr(Stdio::null())
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("Killed"));
            let gone = !Command::new("epmd")
                .args(["-port", &port, "-names"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if killed || gone || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
