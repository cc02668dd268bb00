//! Network faults no loopback can show: a server host whose link goes down (no FIN, no RST:
//! a half-open connection), in a network namespace joined to ours by a veth pair. Addresses
//! come from 198.18.0.0/15 (reserved for network benchmarks). Needs root and namespaces; says
//! why and passes where they are missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A namespace holding one end of a veth pair; the other end is ours. Removed when dropped.
struct Host {
    ns: String,
    outside: String,
    /// Inside the namespace.
    addr: String,
    /// Our end of the link.
    ours: String,
}

impl Host {
    /// `198.18.N.1` on our side, `198.18.N.2` inside.
    fn new() -> Option<Host> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = (std::process::id() % 200) + N.fetch_add(1, Ordering::Relaxed);
        let ns = format!("gs-t{}-{n}", std::process::id());
        if !ip(&["netns", "add", &ns]) {
            return None;
        }
        let (outside, inside) = (format!("gso{n}"), format!("gsi{n}"));
        let h = Host {
            ns: ns.clone(),
            outside: outside.clone(),
            addr: format!("198.18.{n}.2"),
            ours: format!("198.18.{n}.1"),
        };
        let ok = ip(&[
            "link", "add", &outside, "type", "veth", "peer", "name", &inside,
        ]) && ip(&["link", "set", &inside, "netns", &ns])
            && ip(&["addr", "add", &format!("198.18.{n}.1/24"), "dev", &outside])
            && ip(&["link", "set", &outside, "up"])
            && ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", h.addr),
                "dev",
                &inside,
            ])
            && ip(&["-n", &ns, "link", "set", &inside, "up"])
            && ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ok.then_some(h)
    }

    /// Runs `program args` inside the namespace.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    fn link(&self, up: bool) {
        assert!(ip(&[
            "link",
            "set",
            &self.outside,
            if up { "up" } else { "down" }
        ]));
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        ip(&["link", "del", &self.outside]);
        ip(&["netns", "del", &self.ns]);
    }
}

/// A lane asleep on a connection whose server host drops off the network (no FIN, no RST)
/// notices within `dead_peer_timeout`, backs off, and serves again once the link is back.
#[test]
fn a_half_open_connection_is_noticed_within_the_dead_peer_timeout() {
    let Some(host) = Host::new() else {
        skip(
            "network::a_half_open_connection_is_noticed_within_the_dead_peer_timeout",
            "cannot make network namespaces here (needs root)",
        );
        return;
    };
    let sb = Sandbox::new("dead-peer");
    let port = "4730";
    let mut gearmand = spawn(
        host.command("gearmand")
            .args(["-L", &host.addr, "-p", port, "-t", "2", "-l", "stderr"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(sb.path("gearmand.log")).unwrap()),
    );
    let server = format!("{}:{port}", host.addr);
    eventually(Duration::from_secs(10), "gearmand in the namespace", || {
        std::net::TcpStream::connect(&server).is_ok()
    });
    sb.gearman_config(
        std::slice::from_ref(&server),
        "io_timeout = \"1s\"\nreconnect_max = \"1s\"\ndead_peer_timeout = \"4s\"\n",
    );
    let w = sb.start();
    let connected = |s: &serde_json::Value| s["servers"][0]["state"] == "connected";
    w.wait_for(Duration::from_secs(10), "connected", connected);
    // Asleep (PRE_SLEEP sent, nothing in flight): only keepalive can tell the server is gone.
    std::thread::sleep(Duration::from_millis(300));
    host.link(false);
    let down_at = Instant::now();
    let s = w.wait_for(Duration::from_secs(20), "the dead peer noticed", |s| {
        !connected(s)
    });
    let noticed = down_at.elapsed();
    assert!(
        noticed < Duration::from_secs(10),
        "noticed after {noticed:?} (dead_peer_timeout 4s): {}",
        s["servers"]
    );
    host.link(true);
    w.wait_for(Duration::from_secs(15), "reconnected", connected);
    // And it serves: a job submitted from inside the server's host.
    let out = host
        .command(sb.bin.to_str().unwrap())
        .args([
            "-c",
            sb.config().to_str().unwrap(),
            "submit",
            "--timeout",
            "10s",
            "reverse",
            "abc",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "cba");
    let _ = gearmand.kill();
    let _ = gearmand.wait();
}

/// A ZeroMQ client whose host drops off the network (no FIN, no RST) kept its connection, one
/// of `max_connections`, for good: enough such clients (a NAT's timeouts, hosts that died) and
/// every new client was closed as soon as it connected. It is now closed within about
/// `dead_peer_timeout`, as a Gearman server's connection is.
#[test]
fn a_zeromq_client_whose_host_is_gone_is_closed_within_the_dead_peer_timeout() {
    let name = "network::a_zeromq_client_whose_host_is_gone_is_closed_within_the_dead_peer_timeout";
    let Some(host) = Host::new() else {
        skip(name, "cannot make network namespaces here (needs root)");
        return;
    };
    let python = "/usr/bin/python3";
    if !Command::new(python)
        .args(["-c", "import zmq"])
        .status()
        .is_ok_and(|s| s.success())
    {
        skip(name, "needs python3-zmq (scripts/deps installs it)");
        return;
    }
    let sb = Sandbox::new("zmq-dead-peer");
    let endpoint = format!("tcp://{}:{}", host.ours, free_port());
    std::fs::write(
        sb.config(),
        format!(
            "[worker]\nconcurrency = 1\njobs_dir = \"jobs\"\nstate_dir = \"state\"\nallow_root = true\n\n\
             [source]\nkind = \"zeromq\"\nbind = [\"{endpoint}\"]\nallow_remote = true\n\
             function = \"reverse\"\nreply = \"id\"\ndir = \"spool\"\nfsync = false\n\
             dead_peer_timeout = \"4s\"\n"
        ),
    )
    .unwrap();
    let w = sb.start();
    let peers = |s: &serde_json::Value| s["zeromq"]["peers"].as_u64().unwrap_or(0);
    // A REQ client on the other host: one request answered, then quiet, connected.
    let script = "import sys, time, zmq\ns = zmq.Context().socket(zmq.REQ)\n\
                  s.connect(sys.argv[1])\ns.send(b'abc')\nprint(s.recv().decode(), flush=True)\n\
                  time.sleep(120)\n";
    let mut client = spawn(
        host.command(python)
            .args(["-c", script, &endpoint])
            .stdout(Stdio::null()),
    );
    w.wait_for(Duration::from_secs(20), "the client answered", |s| {
        s["zeromq"]["accepted"] == 1 && peers(s) == 1
    });
    host.link(false);
    let down_at = Instant::now();
    let s = w.wait_for(Duration::from_secs(30), "the gone client closed", |s| {
        peers(s) == 0
    });
    let noticed = down_at.elapsed();
    let _ = client.kill();
    let _ = client.wait();
    assert!(
        noticed < Duration::from_secs(12),
        "closed after {noticed:?} (dead_peer_timeout 4s): {}",
        s["zeromq"]
    );
    // Counted as the worker's own close, for an alert on its rate, and across a restart.
    let counted = |s: &serde_json::Value| s["zeromq"]["closed"]["dead_peer"] == 1;
    assert!(counted(&s), "not counted: {}", s["zeromq"]);
    w.signal(nix::sys::signal::Signal::SIGHUP);
    w.wait_generation(2);
    let s = w.status();
    assert!(counted(&s), "not carried: {}", s["zeromq"]);
    let metrics = text(&sb.run(&["metrics"]).stdout);
    let line = "gearshift_zeromq_closed_total{reason=\"dead_peer\"} 1";
    assert!(metrics.contains(line), "no {line} in\n{metrics}");
}
