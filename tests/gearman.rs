//! The Gearman source against a real gearmand on a loopback port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use gearshift::client::gearman::{Client, Outcome, Priority, Update};
use nix::sys::signal::Signal;

fn gearman_cli(port: u16, args: &[&str]) -> std::process::Output {
    Command::new("gearman")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("gearman CLI (gearman-tools)")
}

#[test]
fn jobs_from_the_gearman_cli_are_served() {
    let sb = Sandbox::new("gm-cli");
    let gm = Gearmand::start(&sb.dir, &[]);
    let marker = sb.path("bg-ran");
    sb.job(
        "mark.sh",
        &format!("#!/bin/sh\ncat > {}\n", marker.display()),
    );
    sb.gearman_config(&[gm.addr()], "");
    let w = sb.start();

    let out = gearman_cli(gm.port, &["-f", "reverse", "gearman"]);
    assert_eq!(text(&out.stdout).trim(), "namraeg", "{}", text(&out.stderr));
    let out = gearman_cli(gm.port, &["-b", "-f", "mark", "background payload"]);
    assert!(out.status.success());
    eventually(Duration::from_secs(10), "the background job to run", || {
        std::fs::read_to_string(&marker).is_ok_and(|s| s == "background payload")
    });
    // Our own client: foreground, background, priorities.
    let out = sb.run(&["submit", "--priority", "high", "sha256", "abc"]);
    assert_eq!(
        text(&out.stdout),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let out = sb.run(&["submit", "--background", "--priority", "low", "echo", "x"]);
    assert!(text(&out.stdout).starts_with("H:"), "{}", text(&out.stdout));
    let s = w.wait_for(Duration::from_secs(10), "counts", |s| {
        s["jobs_completed"].as_u64() >= Some(4)
    });
    assert_eq!(s["source"], "gearman");
    // A lane busy-polls for a GRAB's answer (busy_poll, on by default) only while one is out:
    // an idle worker sleeps.
    let used = idle_ticks(&w);
    assert!(used <= 4, "an idle worker used {used} ticks in 2 s");
}

#[test]
fn gearadmin_shows_client_id_and_functions() {
    let sb = Sandbox::new("gm-admin");
    let gm = Gearmand::start(&sb.dir, &[]);
    sb.gearman_config(&[gm.addr()], "client_id = \"resizer\"\n");
    let _w = sb.start();
    let mut listing = String::new();
    eventually(Duration::from_secs(10), "both lanes registered", || {
        let out = Command::new("gearadmin")
            .args(["-p", &gm.port.to_string(), "--workers"])
            .output()
            .unwrap();
        listing = text(&out.stdout);
        listing.contains("resizer:0 :") && listing.contains("resizer:1 :")
    });
    let line = listing.lines().find(|l| l.contains("resizer:0")).unwrap();
    for f in ["echo", "reverse", "sha256", "sleep"] {
        assert!(line.split_whitespace().any(|w| w == f), "{f} not in {line}");
    }
}

/// The functions gearadmin's `--workers` lists for the connection registered as `id`.
fn registered(port: u16, id: &str) -> Option<Vec<String>> {
    let out = Command::new("gearadmin")
        .args(["-p", &port.to_string(), "--workers"])
        .output()
        .unwrap();
    text(&out.stdout).lines().find_map(|l| {
        let (head, functions) = l
            .split_once(" : ")
            .or_else(|| Some((l.strip_suffix(" :")?, "")))?;
        (head.split_whitespace().nth(2) == Some(id))
            .then(|| functions.split_whitespace().map(str::to_string).collect())
    })
}

/// The local ports of `pid`'s TCP connections to `port` on loopback.
fn connections_to(pid: i32, port: u16) -> Vec<String> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let link = std::fs::read_link(e.path()).ok()?;
            let link = link.to_string_lossy();
            Some(
                link.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap();
    let mut ports: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let remote = u16::from_str_radix(f.get(2)?.rsplit(':').next()?, 16).ok()?;
            let ours = inodes.iter().any(|i| Some(&i.as_str()) == f.get(9));
            (remote == port && ours).then(|| f[1].to_string())
        })
        .collect();
    ports.sort();
    ports
}

/// A reload hands each lane's connection to the next generation (the same TCP connections, no
/// new one), registered afresh: a function added or removed by the reload is advertised or
/// withdrawn on it. Over many reloads no connection or descriptor leaks.
#[test]
fn reloads_keep_the_gearman_connections_and_register_the_new_functions() {
    let sb = Sandbox::new("gm-keep");
    let gm = Gearmand::start(&sb.dir, &[]);
    sb.gearman_config(&[gm.addr()], "client_id = \"keep\"\n");
    let w = sb.start();
    let has =
        |lane: &str, f: &str| registered(gm.port, lane).is_some_and(|l| l.iter().any(|x| x == f));
    eventually(Duration::from_secs(10), "both lanes registered", || {
        has("keep:0", "reverse") && has("keep:1", "reverse")
    });
    let before = connections_to(w.pid(), gm.port);
    assert_eq!(before.len(), 2, "{before:?}");

    sb.job("fresh.sh", "#!/bin/sh\necho fresh\n");
    w.wait_generation(2);
    eventually(
        Duration::from_secs(10),
        "fresh registered on both lanes",
        || has("keep:0", "fresh") && has("keep:1", "fresh"),
    );
    assert_eq!(
        before,
        connections_to(w.pid(), gm.port),
        "the same connections, taken over"
    );
    let out = gearman_cli(gm.port, &["-f", "fresh", "x"]);
    assert_eq!(text(&out.stdout).trim(), "fresh", "{}", text(&out.stderr));

    std::fs::remove_file(sb.dir.join("jobs/fresh.sh")).unwrap();
    w.wait_generation(3);
    eventually(Duration::from_secs(10), "fresh withdrawn", || {
        !has("keep:0", "fresh") && !has("keep:1", "fresh")
    });
    assert!(has("keep:0", "reverse") && has("keep:1", "reverse"));
    assert_eq!(
        before,
        connections_to(w.pid(), gm.port),
        "still the same connections"
    );

    w.wait_hashed();
    let descriptors = w.fd_count();
    for g in 4..=23 {
        w.signal(Signal::SIGHUP);
        w.wait_generation(g);
    }
    w.wait_hashed();
    let out = gearman_cli(gm.port, &["-f", "reverse", "kept"]);
    assert_eq!(text(&out.stdout).trim(), "tpek", "{}", text(&out.stderr));
    assert_eq!(
        before,
        connections_to(w.pid(), gm.port),
        "after 20 more reloads"
    );
    assert_eq!(descriptors, w.fd_count(), "{}", w.fd_list());
    let s = w.status();
    assert_eq!(s["servers"][0]["state"], "connected", "{s}");
    assert_eq!(s["servers"][0]["lanes_connected"], 2, "{s}");
    assert_eq!(s["servers"][0]["reconnects"], 0, "{s}");
}

#[test]
fn executable_progress_reaches_a_foreground_client() {
    let sb = Sandbox::new("gm-progress");
    let gm = Gearmand::start(&sb.dir, &[]);
    sb.job(
        "steps.sh",
        "#!/bin/sh\necho 'status 1 3' >&3\necho 'data first ' >&3\necho 'warning careful' >&3\necho 'status 3 3' >&3\ntr a-z A-Z\n",
    );
    sb.gearman_config(&[gm.addr()], "");
    let _w = sb.start();
    let mut c = Client::connect(&[gm.addr()], 1 << 20).unwrap();
    let mut updates = Vec::new();
    let outcome = c
        .submit("steps", "", b"done", Priority::Normal, |u| {
            updates.push(match u {
                Update::Data(d) => format!("data {}", text(d)),
                Update::Warning(w) => format!("warning {}", text(w)),
                Update::Status(n, d) => format!("status {n}/{d}"),
            })
        })
        .unwrap();
    assert_eq!(outcome, Outcome::Complete(b"DONE".to_vec()));
    assert_eq!(
        updates,
        ["status 1/3", "data first ", "warning careful", "status 3/3"]
    );

    // With exceptions on, a failure's text reaches the client.
    sb.job("bad.sh", "#!/bin/sh\necho 'no good' >&2\nexit 4\n");
    _w.wait_generation(2);
    sb.gearman_config(&[gm.addr()], "exceptions = true\n");
    _w.wait_generation(3);
    let mut warnings = Vec::new();
    let outcome = c
        .submit("bad", "", b"", Priority::Normal, |u| {
            if let Update::Warning(w) = u {
                warnings.push(text(w));
            }
        })
        .unwrap();
    assert_eq!(outcome, Outcome::Fail);
    assert_eq!(warnings, ["exit status 4: no good"]);
}

#[test]
fn late_result_after_can_do_timeout_keeps_the_connection() {
    let mut sb = Sandbox::new("gm-timeout");
    sb.bin = example("custom_worker");
    let gm = Gearmand::start(&sb.dir, &["-j", "1"]);
    sb.gearman_config(&[gm.addr()], "[functions.slow]\ntimeout = \"1s\"\n");
    let w = sb.start();
    let mut c = Client::connect(&[gm.addr()], 1 << 20).unwrap();
    // A 1 s timeout is advertised to gearmand as 6 s (the local kill must win; see
    // `server_timeout_ms`). This Rust function ignores its deadline: gearmand silently requeues
    // the job after 6 s (whatever -j says, it keeps reassigning a timed-out job), and our result
    // at 6.5 s is rejected with JOB_NOT_FOUND.
    c.submit_background("slow", "", b"6500", Priority::Normal)
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "the rejection to be logged",
        || w.log_text().contains("JOB_NOT_FOUND"),
    );
    // The same connections keep serving.
    let outcome = c
        .submit("reverse", "", b"abc", Priority::Normal, |_| {})
        .unwrap();
    assert_eq!(outcome, Outcome::Complete(b"cba".to_vec()));
    let s = w.status();
    assert_eq!(s["servers"][0]["reconnects"], 0, "{s}");
    assert_eq!(s["servers"][0]["state"], "connected", "{s}");
}

#[test]
fn worker_reconnects_after_gearmand_restarts() {
    let sb = Sandbox::new("gm-restart");
    let mut gm = Gearmand::start(&sb.dir, &[]);
    let port = gm.port;
    sb.gearman_config(&[gm.addr()], "");
    let w = sb.start();
    let out = sb.run(&["submit", "reverse", "one"]);
    assert_eq!(text(&out.stdout), "eno");
    gm.kill();
    w.wait_for(Duration::from_secs(10), "the worker to notice", |s| {
        s["servers"][0]["state"] != "connected"
    });
    let _gm2 = Gearmand::start_on(&sb.dir, port, &[]);
    let mut c = Client::connect(&[format!("127.0.0.1:{port}")], 1 << 20).unwrap();
    let outcome = c
        .submit("reverse", "", b"two", Priority::Normal, |_| {})
        .unwrap();
    assert_eq!(outcome, Outcome::Complete(b"owt".to_vec()));
    assert_eq!(w.status()["generation"], 1, "reconnected without a restart");
}

#[test]
fn one_server_down_the_other_serves() {
    let sb = Sandbox::new("gm-two");
    let gm = Gearmand::start(&sb.dir, &[]);
    let dead = format!("127.0.0.1:{}", free_port());
    sb.gearman_config(&[dead, gm.addr()], "");
    let _w = sb.start();
    let mut c = Client::connect(&[gm.addr()], 1 << 20).unwrap();
    for i in 0..20 {
        let payload = format!("job{i}");
        let outcome = c
            .submit("echo", "", payload.as_bytes(), Priority::Normal, |_| {})
            .unwrap();
        assert_eq!(outcome, Outcome::Complete(payload.into_bytes()));
    }
}

#[test]
fn garbage_from_a_fake_server_is_survived() {
    let sb = Sandbox::new("gm-garbage");
    let gm = Gearmand::start(&sb.dir, &[]);
    let fake = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_addr = fake.local_addr().unwrap().to_string();
    let served = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&served);
    std::thread::spawn(move || {
        let replies: [&[u8]; 5] = [
            b"HTTP/1.1 400 Bad Request\r\n\r\n",
            b"\0RES\0\0\0\x63\0\0\0\0",                 // unknown type 99
            b"\0RES\0\0\0\x0b\xff\xff\xff\xff",         // JOB_ASSIGN claiming 4 GiB of data
            b"\0RES\0\0\0\x0b\0\0\0\x05ab",             // truncated, then closed
            b"\0RES\0\0\0\x13\0\0\0\x0dERR_TEST\0boom", // a well-formed ERROR
        ];
        for (i, conn) in fake.incoming().enumerate() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 4096];
            let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(replies[i % replies.len()]);
            if i >= 4 {
                flag.store(true, Ordering::Release);
            }
        }
    });
    sb.gearman_config(&[fake_addr, gm.addr()], "");
    let w = sb.start();
    eventually(Duration::from_secs(30), "four rounds of garbage", || {
        served.load(Ordering::Acquire)
    });
    let log = w.log_text();
    assert!(log.contains("bad packet magic"), "{log}");
    assert!(log.contains("unknown packet type 99"), "{log}");
    assert!(log.contains("over max_packet_bytes"), "{log}");
    eventually(Duration::from_secs(10), "the ERROR to be logged", || {
        w.log_text().contains("server error ERR_TEST: boom")
    });
    // Still alive, still serving from the real server.
    let mut c = Client::connect(&[gm.addr()], 1 << 20).unwrap();
    let outcome = c
        .submit("reverse", "", b"ok", Priority::Normal, |_| {})
        .unwrap();
    assert_eq!(outcome, Outcome::Complete(b"ko".to_vec()));
    assert_eq!(w.status()["generation"], 1);
}

/// The proof of section 2 of the Gearman issue: with `-j 1` any requeue of a job becomes a
/// WORK_FAIL. Thousands of foreground jobs from several connections while HUPs arrive every few
/// ms and config.toml is edited: every client gets its own correct result, exactly once.
#[test]
fn reloads_under_load_requeue_nothing() {
    let sb = Sandbox::new("gm-chaos");
    let gm = Gearmand::start(&sb.dir, &["-j", "1"]);
    sb.gearman_config(&[gm.addr()], "");
    let w = sb.start();
    let pid = w.pid();
    let addr = gm.addr();
    let done = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut client = Client::connect(&[addr], 1 << 20).unwrap();
                let mut wrong = Vec::new();
                for i in 0..1300 {
                    let payload = format!("client{c}-job{i}");
                    let want: Vec<u8> = payload.bytes().rev().collect();
                    match client
                        .submit("reverse", "", payload.as_bytes(), Priority::Normal, |_| {})
                        .unwrap()
                    {
                        Outcome::Complete(got) if got == want => {}
                        other => wrong.push(format!("{payload}: {other:?}")),
                    }
                }
                wrong
            })
        })
        .collect();
    let signaller = {
        let done = Arc::clone(&done);
        let config = sb.config();
        let base = std::fs::read_to_string(&config).unwrap();
        std::thread::spawn(move || {
            let mut hups = 0;
            let mut edits = 0;
            while !done.load(Ordering::Acquire) {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGHUP).unwrap();
                hups += 1;
                if hups % 25 == 0 {
                    edits += 1;
                    std::fs::write(&config, format!("{base}# edit {edits}\n")).unwrap();
                }
                std::thread::sleep(Duration::from_millis(4));
            }
            (hups, edits)
        })
    };
    let started = Instant::now();
    let wrong: Vec<String> = clients
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    done.store(true, Ordering::Release);
    let (hups, edits) = signaller.join().unwrap();
    assert!(
        wrong.is_empty(),
        "{} wrong of 5200, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    let s = w.wait_for(Duration::from_secs(30), "settled", |s| {
        s["state"] == "running"
    });
    assert_eq!(s["pid"], pid);
    assert!(
        s["generation"].as_u64().unwrap() > 10,
        "restarts happened: {s} ({hups} HUPs, {edits} edits)"
    );
    assert_eq!(s["jobs_failed"], 0);
    assert!(
        edits >= 2,
        "config was edited during the load ({:?})",
        started.elapsed()
    );
}

/// The harness's own flake (a CI run, 2026-12-04): gearmand retries a port in use without a
/// word, so a listener of another process on the port (another test run's) answered the start's
/// probe, went away, and the test's client was refused before gearmand took the port. The
/// helper now returns only once gearmand itself listens, and ports are reserved across test
/// processes.
#[test]
fn the_gearmand_helper_returns_only_once_its_own_gearmand_listens() {
    let sb = Sandbox::new("gm-helper");
    let port = free_port();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        drop(squatter);
    });
    let gm = Gearmand::start_on(&sb.dir, port, &[]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gm.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"version\n").unwrap();
    let mut answer = [0u8; 64];
    let n = s.read(&mut answer).unwrap_or(0);
    assert!(
        answer[..n].starts_with(b"OK "),
        "the helper returned before gearmand listened: {:?}",
        text(&answer[..n])
    );
    release.join().unwrap();
}

/// The clients the PHP daemons' applications submit with, in two languages and two protocol
/// implementations: php-gearman (libgearman's `GearmanClient`) and Perl's `Gearman::Client`
/// (pure Perl, from CPAN). Each sees results (binary ones too), a failure as WORK_FAIL, a
/// job's progress (status, data, warning) while it runs, a background job's status polled,
/// and many concurrent tasks answered right, while the worker restarts under them (HUPs every
/// 100 ms for as long as the clients run).
#[test]
fn php_and_perl_gearman_clients_are_served_through_restarts() {
    let sb = Sandbox::new("gm-clients");
    let gm = Gearmand::start(&sb.dir, &[]);
    sb.job(
        "progress.sh",
        "#!/bin/sh\nread x\necho 'status 1 2' >&3\nsleep 0.3\necho 'data part1-' >&3\n\
         echo 'warning careful' >&3\necho 'status 2 2' >&3\nsleep 0.3\nprintf 'done:%s' \"$x\"\n",
    );
    sb.job("fail.sh", "#!/bin/sh\necho 'bad thing' >&2\nexit 3\n");
    sb.gearman_config(&[gm.addr()], "");
    let w = sb.start();
    let clients = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
    let run = |program: &str, script: &str| {
        let child = Command::new(program)
            .arg(clients.join(script))
            .args([&gm.port.to_string(), "2000"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let hups = {
            let (done, pid) = (Arc::clone(&done), w.pid());
            std::thread::spawn(move || {
                let mut sent = 0;
                while !done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGHUP);
                    sent += 1;
                }
                sent
            })
        };
        let out = child.wait_with_output().unwrap();
        done.store(true, Ordering::SeqCst);
        let sent = hups.join().unwrap();
        assert!(out.status.success(), "{program}: {}", text(&out.stderr));
        (text(&out.stdout), sent)
    };
    let progress = "status 1/2\ndata part1-\nwarning careful\nstatus 2/2\n";
    let (php, php_hups) = run("php", "gearman_client.php");
    assert_eq!(
        php,
        format!(
            "normal olleh\nbinary 610062ff\n\
             low ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n\
             fail WORK_FAIL []\ndoNormal part1-done:p0\n{progress}complete done:p1\n\
             background saw 1/2 saw 2/2 ended\ntasks 2000 done, 0 wrong\n"
        )
    );
    let (perl, perl_hups) = run("perl", "gearman_client.pl");
    assert_eq!(
        perl,
        format!(
            "normal olleh\nbinary 610062ff\nfail undef on_fail 1\n{progress}complete done:pl\n\
             background saw 1/2 saw 2/2 ended\ntasks 2000 done, 0 wrong\n"
        )
    );
    // The worker restarted under them (HUPs that come while one is under way are taken as one).
    let s = w.status();
    assert!(
        s["generation"].as_u64() >= Some(3) && php_hups + perl_hups >= 10,
        "generation {} after {php_hups} + {perl_hups} HUPs",
        s["generation"]
    );
}
