//! RabbitMQ nodes for tests: Debian's rabbitmq-server started without systemd, on free loopback
//! ports, with its own HOME (Erlang cookie), mnesia and logs. A test that kills, freezes or
//! configures its broker starts a private node ([`Rabbit::start`], killed with its epmd when
//! dropped); the others share one node per test binary ([`Rabbit::shared`]), each in a virtual
//! host of its own, for a node's boot costs about 4 s of CPU here (the suite booted 21).

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
    /// The test's virtual host: `/` on a private node.
    pub vhost: String,
    /// One of the shared node's virtual hosts: dropping it leaves the node running.
    shared: bool,
}

/// Virtual hosts the shared node is booted with (a definitions file), one per test that asks.
const SHARED_VHOSTS: usize = 32;

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
        let mut r = Rabbit::unbooted(
            dir.join(format!("rabbit-{}", free_port())),
            extra.to_string(),
            false,
        );
        r.boot();
        r
    }

    /// A node's settings on free ports, not started.
    fn unbooted(dir: PathBuf, extra: String, shared: bool) -> Rabbit {
        let port = free_port();
        Rabbit {
            dir,
            port,
            tls_port: None,
            node: format!("gs{port}@localhost"),
            epmd_port: free_port(),
            dist_port: free_port(),
            child: None,
            extra,
            vhost: "/".to_string(),
            shared,
        }
    }

    /// A virtual host of its own on the node this test binary shares (booted by the first test
    /// that asks), for a test that neither stops, freezes nor reconfigures its broker. The node
    /// outlives the tests: a shell beside it kills it (and its epmd) once this process's end
    /// closes the pipe it reads.
    pub fn shared() -> Rabbit {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Mutex, OnceLock};
        static NODE: OnceLock<Mutex<Option<Rabbit>>> = OnceLock::new();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let mut node = NODE
            .get_or_init(|| Mutex::new(None))
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let base = node.get_or_insert_with(Rabbit::boot_shared);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(
            n < SHARED_VHOSTS,
            "more tests share the node than it has virtual hosts: raise SHARED_VHOSTS"
        );
        Rabbit {
            dir: base.dir.clone(),
            node: base.node.clone(),
            child: None,
            extra: String::new(),
            vhost: format!("t{n}"),
            ..*base
        }
    }

    fn boot_shared() -> Rabbit {
        let mut r = Rabbit::unbooted(
            std::env::temp_dir().join(format!("gs-rabbit-{}-{}", std::process::id(), free_port())),
            String::new(),
            true,
        );
        let _ = fs::remove_dir_all(&r.dir);
        fs::create_dir_all(&r.dir).unwrap();
        let defs = r.dir.join("definitions.json");
        fs::write(&defs, shared_definitions()).unwrap();
        r.extra = format!("load_definitions = {}\n", defs.display());
        // The server in a session of its own ($! is its process group); on EOF (this process
        // gone), that group killed, epmd told to go once it has noticed, the directory removed.
        let keeper = "setsid \"$@\" & node=$!\n\
            read -r _\n\
            kill -9 -$node 2>/dev/null; wait\n\
            for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do\n\
              epmd -port \"$ERL_EPMD_PORT\" -kill 2>/dev/null | grep -q Killed && break\n\
              epmd -port \"$ERL_EPMD_PORT\" -names >/dev/null 2>&1 || break\n\
              sleep 0.1\n\
            done\n\
            rm -rf \"$HOME\"";
        let mut sh = Command::new("sh");
        sh.args(["-c", keeper, "sh", SERVER]);
        r.spawn_and_wait(sh, Stdio::piped());
        // The pipe's write end, kept open until this process ends.
        if let Some(mut child) = r.child.take() {
            std::mem::forget(child.stdin.take());
            std::mem::forget(child);
        }
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
        assert!(
            !self.shared,
            "the shared node is never stopped nor started again"
        );
        self.spawn_and_wait(Command::new(SERVER), Stdio::null());
    }

    /// Writes the node's files and starts it with `cmd` (`SERVER`, or [`Rabbit::shared`]'s
    /// keeper shell, whose standard input is a pipe).
    fn spawn_and_wait(&mut self, mut cmd: Command, stdin: Stdio) {
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
        self.env(&mut cmd);
        use std::os::unix::process::CommandExt;
        cmd.stdin(stdin)
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
        let vhost = if self.vhost == "/" {
            "%2f"
        } else {
            &self.vhost
        };
        format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", self.port)
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

    /// `rabbitmqctl list_<what>` of this test's virtual host (`queues`, `consumers`,
    /// `connections`): a row of `columns` each.
    pub fn list(&self, what: &str, columns: &[&str]) -> Vec<Vec<String>> {
        let command = format!("list_{what}");
        let mut args = vec!["-q", command.as_str()];
        // Connections are listed for the whole node: by their virtual host, then.
        let by_vhost = what == "connections";
        if by_vhost {
            args.push("vhost");
        } else {
            args.extend(["-p", self.vhost.as_str()]);
        }
        args.extend(columns);
        self.ctl(&args)
            .lines()
            .skip(1) // the columns' names
            .map(|l| l.split('\t').map(str::to_string).collect::<Vec<_>>())
            .filter(|f| !by_vhost || f.first() == Some(&self.vhost))
            .map(|mut f| {
                if by_vhost {
                    f.remove(0);
                }
                f
            })
            .collect()
    }

    /// Messages ready and unacknowledged in `queue`.
    pub fn depth(&self, queue: &str) -> (u64, u64) {
        let rows = self.list(
            "queues",
            &["name", "messages_ready", "messages_unacknowledged"],
        );
        for f in rows {
            if f.len() == 3 && f[0] == queue {
                return (f[1].parse().unwrap_or(0), f[2].parse().unwrap_or(0));
            }
        }
        (0, 0)
    }
}

/// The shared node's definitions: the virtual hosts `t0`.. and the user guest (password guest),
/// allowed everything in each (a node importing definitions at boot creates no default user).
fn shared_definitions() -> String {
    use sha2::{Digest, Sha256};
    // rabbit_password_hashing_sha256: base64(salt ++ sha256(salt ++ password)).
    let salt = [0x90u8, 0x8d, 0xc6, 0x0a];
    let mut hashed = salt.to_vec();
    hashed.extend(
        Sha256::new()
            .chain_update(salt)
            .chain_update(b"guest")
            .finalize(),
    );
    let vhosts: Vec<String> = (0..SHARED_VHOSTS)
        .map(|n| format!("{{\"name\":\"t{n}\"}}"))
        .collect();
    let permissions: Vec<String> = (0..SHARED_VHOSTS)
        .map(|n| {
            format!(
                "{{\"user\":\"guest\",\"vhost\":\"t{n}\",\"configure\":\".*\",\"write\":\".*\",\"read\":\".*\"}}"
            )
        })
        .collect();
    format!(
        "{{\"users\":[{{\"name\":\"guest\",\"password_hash\":\"{}\",\"hashing_algorithm\":\"rabbit_password_hashing_sha256\",\"tags\":\"administrator\"}}],\
         \"vhosts\":[{}],\"permissions\":[{}]}}",
        base64(&hashed),
        vhosts.join(","),
        permissions.join(",")
    )
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Drop for Rabbit {
    /// Kills the node, then its epmd (a daemon outside the node's process group). epmd refuses
    /// `-kill` while it still lists the node, which it drops only once it notices the killed
    /// node's connection closed: asked again for up to 2 s.
    fn drop(&mut self) {
        if self.shared {
            return;
        }
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
