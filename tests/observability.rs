//! Observability: the Prometheus endpoint (its socket and counters carried across every
//! re-exec), `gearshift metrics`, JSON log lines, and `gearshift top` in a real terminal (tmux).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

/// A GET over a fresh connection: (status code, body).
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    let code = out
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {out:?}")))?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok((code, body.to_string()));
    }
    // Chunked (Prometheus' larger answers): size line, data, CRLF; a 0 size ends it.
    let (mut rest, mut data) = (body, String::new());
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        data.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    Ok((code, data))
}

/// `name{labels}` -> value, from an exposition.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn metrics_config(sb: &Sandbox, extra: &str) {
    sb.write_config(&format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[functions.slow]\ntimeout = \"300ms\"\n\n{extra}"
    ));
    sb.job("up.sh", "#!/bin/sh\ntr a-z A-Z\n");
    sb.job("bad.sh", "#!/bin/sh\necho broken >&2\nexit 3\n");
    sb.job("slow.sh", "#!/bin/sh\nexec sleep 5\n");
}

fn metrics_addr(w: &Worker) -> String {
    let s = w.wait_for(Duration::from_secs(10), "metrics address", |s| {
        s["metrics"].is_string()
    });
    s["metrics"].as_str().unwrap().to_string()
}

#[test]
fn metrics_count_every_outcome_pass_promtool_and_match_the_cli() {
    let sb = Sandbox::new("metrics-basic");
    metrics_config(&sb, "");
    let w = sb.start();
    let addr = metrics_addr(&w);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(sb.submit("up", &format!("a{i}")));
    }
    ids.push(sb.submit("bad", "x"));
    ids.push(sb.submit("slow", "x"));
    ids.push(sb.submit("nosuchfunction", "x"));
    all_outcomes(&sb, &ids, Duration::from_secs(30));
    let (code, body) = http_get(&addr, "/metrics").unwrap();
    assert_eq!(code, 200);
    let m = samples(&body);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("{k} missing in\n{body}"));
    assert_eq!(
        get(r#"gearshift_jobs_total{function="up",outcome="done"}"#),
        5.0
    );
    assert_eq!(
        get(r#"gearshift_jobs_total{function="bad",outcome="failed"}"#),
        1.0
    );
    assert_eq!(
        get(r#"gearshift_jobs_total{function="slow",outcome="timed_out"}"#),
        1.0
    );
    // A name from whoever submits never becomes a label value.
    assert_eq!(
        get(r#"gearshift_jobs_total{function="(unknown)",outcome="failed"}"#),
        1.0
    );
    assert!(!body.contains("nosuchfunction"));
    assert_eq!(
        get(r#"gearshift_job_duration_seconds_count{function="up"}"#),
        5.0
    );
    assert!(get(r#"gearshift_job_duration_seconds_sum{function="slow"}"#) >= 0.3);
    assert_eq!(get("gearshift_generation"), 1.0);
    assert_eq!(get("gearshift_lanes"), 2.0);
    assert_eq!(get("gearshift_spool_queue_depth"), 0.0);
    assert!(get("process_resident_memory_bytes") > 1e6);
    assert!(get("process_open_fds") > 3.0);
    assert_eq!(http_get(&addr, "/").unwrap().0, 404);

    // The same text through the status socket.
    let out = sb.run(&["metrics"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let cli = samples(&text(&out.stdout));
    assert_eq!(
        cli[r#"gearshift_jobs_total{function="up",outcome="done"}"#],
        5.0
    );
    assert_eq!(
        cli.keys().filter(|k| k.starts_with("gearshift_")).count(),
        m.keys().filter(|k| k.starts_with("gearshift_")).count()
    );

    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(mut p) => {
            p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
            let out = p.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool: {}{}",
                text(&out.stdout),
                text(&out.stderr)
            );
        }
        Err(e) => skip(
            "observability: promtool check metrics",
            &format!("no promtool ({e}): install Debian's prometheus package"),
        ),
    }
}

#[test]
fn a_queue_shows_its_depth_and_the_age_of_its_oldest_job() {
    let sb = Sandbox::new("metrics-queue");
    metrics_config(&sb, "");
    // One lane, busy for a while with the first job: the others wait.
    let cfg = fs::read_to_string(sb.config())
        .unwrap()
        .replace("concurrency = 2", "concurrency = 1");
    fs::write(sb.config(), cfg).unwrap();
    sb.submit("sleep", "3000");
    for i in 0..7 {
        sb.submit("up", &format!("q{i}"));
    }
    std::thread::sleep(Duration::from_millis(1100));
    let w = sb.start();
    let addr = metrics_addr(&w);
    let m = samples(&http_get(&addr, "/metrics").unwrap().1);
    let depth = m["gearshift_spool_queue_depth"];
    assert!((6.0..=8.0).contains(&depth), "depth {depth}");
    assert!(m["gearshift_spool_oldest_job_age_seconds"] >= 1.0, "{m:?}");
}

#[test]
fn reloads_keep_the_socket_and_the_counters_and_no_scrape_is_refused() {
    let sb = Sandbox::new("metrics-reloads");
    metrics_config(&sb, "");
    let w = sb.start();
    let addr = metrics_addr(&w);
    // A client scraping as fast as it can for the whole storm.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = {
        let (stop, addr) = (stop.clone(), addr.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed, mut last_done) = (0u64, Vec::new(), 0.0);
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                match http_get(&addr, "/metrics") {
                    Ok((200, body)) => {
                        ok += 1;
                        let done = samples(&body)
                            .get(r#"gearshift_jobs_total{function="up",outcome="done"}"#)
                            .copied()
                            .unwrap_or(0.0);
                        assert!(
                            done >= last_done,
                            "counter went down: {last_done} -> {done}"
                        );
                        last_done = done;
                    }
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        })
    };
    let mut ids = Vec::new();
    for round in 0..30 {
        ids.push(sb.submit("up", &format!("r{round}")));
        let g = w.generation();
        w.signal(Signal::SIGHUP);
        w.wait_generation(g + 1);
    }
    all_outcomes(&sb, &ids, Duration::from_secs(30));
    stop.store(true, std::sync::atomic::Ordering::Release);
    let (ok, failed) = scraper.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} scrapes failed: {:?}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 30, "only {ok} scrapes");
    let m = samples(&http_get(&addr, "/metrics").unwrap().1);
    assert_eq!(
        m[r#"gearshift_jobs_total{function="up",outcome="done"}"#],
        30.0
    );
    assert_eq!(m[r#"gearshift_restarts_total{reason="sighup"}"#], 30.0);
    assert_eq!(m["gearshift_restart_pause_seconds_count"], 30.0);
    assert_eq!(m["gearshift_generation"], 31.0);
    assert_eq!(
        m[r#"gearshift_job_duration_seconds_count{function="up"}"#],
        30.0
    );

    // A reload that moves the endpoint closes the old port; one that drops [metrics] closes it.
    let moved = format!("127.0.0.1:{}", free_port());
    let cfg = fs::read_to_string(sb.config())
        .unwrap()
        .replace("127.0.0.1:0", &moved);
    fs::write(sb.config(), &cfg).unwrap();
    let s = w.wait_for(Duration::from_secs(10), "moved", |s| {
        s["metrics"] == moved.as_str()
    });
    assert_eq!(s["last_restart_reason"], "config changed");
    assert!(http_get(&addr, "/metrics").is_err(), "old port still open");
    let m = samples(&http_get(&moved, "/metrics").unwrap().1);
    assert_eq!(
        m[r#"gearshift_jobs_total{function="up",outcome="done"}"#], 30.0,
        "counters carried"
    );
    let g = w.generation();
    fs::write(
        sb.config(),
        cfg.replace(&format!("[metrics]\nlisten = \"{moved}\""), ""),
    )
    .unwrap();
    let s = w.wait_generation(g + 1);
    assert!(s["metrics"].is_null(), "{s}");
    assert!(
        http_get(&moved, "/metrics").is_err(),
        "port still open without [metrics]"
    );
}

#[test]
fn a_non_loopback_listen_address_is_refused_unless_allowed() {
    let sb = Sandbox::new("metrics-remote");
    sb.write_config("[metrics]\nlisten = \"0.0.0.0:9464\"\n");
    let out = sb.run(&["check"]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    // file:line:col pointing at the value.
    let line = sb
        .config_text("[metrics]\nlisten = \"0.0.0.0:9464\"\n")
        .lines()
        .count();
    assert!(
        err.contains(&format!("config.toml:{line}:10:")) && err.contains("allow_remote"),
        "{err}"
    );
    // localhost is the loopback address, as everywhere else; another name is never resolved
    // (a listen address that moves with DNS), and is said as such.
    sb.write_config("[metrics]\nlisten = \"localhost:9464\"\n");
    let out = sb.run(&["check"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    sb.write_config("[metrics]\nlisten = \"metrics.example:9464\"\n");
    let err = text(&sb.run(&["check"]).stderr);
    assert!(
        err.contains("is not an address:port")
            && err.contains("names other than localhost are not resolved"),
        "{err}"
    );
    sb.write_config("[metrics]\nlisten = \"0.0.0.0:9464\"\nallow_remote = true\n");
    let out = sb.run(&["check"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn json_log_lines_carry_the_job_fields() {
    let sb = Sandbox::new("json-log");
    metrics_config(&sb, "[log]\nformat = \"json\"\njobs = true\n");
    let w = sb.start();
    let ids = vec![sb.submit("up", "j"), sb.submit("bad", "j")];
    all_outcomes(&sb, &ids, Duration::from_secs(20));
    let g = w.generation();
    w.signal(Signal::SIGHUP);
    w.wait_generation(g + 1);
    // Status says "running" once the helpers are up, a moment before the new generation's
    // "serving" line is written: wait for that line, and read only whole lines.
    eventually(Duration::from_secs(10), "a line of generation 2", || {
        w.log_text().contains("\"generation\":2")
    });
    let log = w.log_text();
    let lines: Vec<Value> = log
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for l in &lines {
        assert!(
            l["time"].is_string() && l["level"].is_string() && l["message"].is_string(),
            "{l}"
        );
    }
    let job = |id: &str| {
        lines
            .iter()
            .find(|l| l["job"] == id)
            .unwrap_or_else(|| panic!("no line for job {id} in\n{log}"))
            .clone()
    };
    let done = job(&ids[0]);
    assert_eq!(
        (
            done["level"].as_str(),
            done["function"].as_str(),
            done["outcome"].as_str()
        ),
        (Some("info"), Some("up"), Some("done"))
    );
    assert!(done["duration_ms"].as_f64().is_some() && done["generation"] == 1);
    let failed = job(&ids[1]);
    assert_eq!(
        (failed["level"].as_str(), failed["outcome"].as_str()),
        (Some("warn"), Some("failed"))
    );
    assert!(
        lines.iter().any(|l| l["generation"] == 2),
        "the new generation logs JSON too"
    );
}

/// Starts `gearshift top --interval 200ms` in a detached tmux session of its own server
/// (120x40); returns a runner of tmux commands on that server.
fn top_in_tmux(sb: &Sandbox, name: &str) -> (impl Fn(&[&str]) -> std::process::Output, TmuxServer) {
    in_tmux(sb, name, "top --interval 200ms")
}

/// tmux is missing: `test` is skipped (a failure under CI).
fn no_tmux(test: &str) -> bool {
    let missing = Command::new("tmux").arg("-V").output().is_err();
    if missing {
        skip(test, "no tmux");
    }
    missing
}

/// Starts `gearshift ARGS` in a detached tmux session of its own server (120x40); returns a
/// runner of tmux commands on that server.
/// The guard kills that server when the test ends, pass or fail (a failing test left it running).
fn in_tmux(
    sb: &Sandbox,
    name: &str,
    args: &str,
) -> (impl Fn(&[&str]) -> std::process::Output, TmuxServer) {
    let server = format!("{name}-{}", std::process::id());
    let guard = TmuxServer(server.clone());
    let tmux = move |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &server])
            .args(args)
            .output()
            .unwrap()
    };
    let cmd = format!("{} -c {} {args}", sb.bin.display(), sb.config().display());
    assert!(tmux(&["new-session", "-d", "-x", "120", "-y", "40", &cmd])
        .status
        .success());
    (tmux, guard)
}

/// Kills its tmux server when dropped.
struct TmuxServer(String);

impl Drop for TmuxServer {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.0, "kill-server"])
            .stderr(std::process::Stdio::null())
            .output();
    }
}

/// The screen of the tmux session `top_in_tmux` started.
fn top_screen(tmux: &dyn Fn(&[&str]) -> std::process::Output) -> String {
    text(&tmux(&["capture-pane", "-p", "-t", "0"]).stdout)
}

/// Waits up to `limit` for the screen to satisfy `ok` (else fails, showing it).
fn wait_screen(
    tmux: &dyn Fn(&[&str]) -> std::process::Output,
    what: &str,
    limit: Duration,
    ok: &dyn Fn(&str) -> bool,
) {
    let deadline = Instant::now() + limit;
    loop {
        let s = top_screen(tmux);
        if ok(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}:\n{s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Presses `q` and waits up to `limit` for top (its session) to end; false if it did not.
fn quits_on_q(tmux: &dyn Fn(&[&str]) -> std::process::Output, limit: Duration) -> bool {
    tmux(&["send-keys", "-t", "0", "q"]);
    let deadline = Instant::now() + limit;
    while tmux(&["has-session"]).status.success() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

#[test]
fn top_shows_lanes_functions_and_quits_on_q() {
    if no_tmux("observability::top_shows_lanes_functions_and_quits_on_q") {
        return;
    }
    let sb = Sandbox::new("top");
    metrics_config(&sb, "");
    let w = sb.start();
    let _ = metrics_addr(&w);
    let ids: Vec<String> = (0..4).map(|i| sb.submit("up", &format!("t{i}"))).collect();
    all_outcomes(&sb, &ids, Duration::from_secs(20));
    let long = sb.submit("sleep", "20000");
    let (tmux, _server) = top_in_tmux(&sb, "gs-top");
    let screen = || text(&tmux(&["capture-pane", "-p", "-t", "0"]).stdout);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    while Instant::now() < deadline {
        last = screen();
        // The running job with its function on a lane line, and the `up` row with its count.
        let lane_busy = last
            .lines()
            .any(|l| l.contains(&long) && l.contains("sleep"));
        let up_row = last.lines().any(|l| {
            l.split_whitespace().next() == Some("up") && l.split_whitespace().nth(2) == Some("4")
        });
        if lane_busy && up_row && last.contains("generation 1") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        last.contains(&long) && last.contains("q: quit"),
        "screen:\n{last}"
    );
    assert!(
        quits_on_q(&tmux, Duration::from_secs(5)),
        "top did not quit on q:\n{}",
        screen()
    );
}

/// A window smaller than the view: 30 functions' rows ran past the bottom, so every refresh
/// scrolled the header off the top, and long lines wrapped. Now the view fits the window (and
/// follows a resize): the header on the first row, the key hint on the last, every line cut
/// at the right edge, and a line saying how many were left out.
#[test]
fn top_fits_a_window_smaller_than_its_view() {
    if no_tmux("observability::top_fits_a_window_smaller_than_its_view") {
        return;
    }
    let sb = Sandbox::new("top-small");
    sb.write_config("");
    for i in 0..30 {
        sb.job(&format!("resize_image_variant_{i:02}"), "#!/bin/sh\ncat\n");
    }
    let _w = sb.start();
    let (tmux, _server) = top_in_tmux(&sb, "gs-top-small");
    wait_screen(&tmux, "the whole view", Duration::from_secs(15), &|s| {
        s.contains("resize_image_variant_00")
    });
    assert!(tmux(&["resize-window", "-t", "0", "-x", "50", "-y", "12"])
        .status
        .success());
    wait_screen(&tmux, "the view fitted", Duration::from_secs(15), &|s| {
        let lines: Vec<&str> = s.trim_end().lines().collect();
        lines
            .first()
            .is_some_and(|l| l.starts_with("gearshift") && l.contains("pid"))
            && lines.last() == Some(&"q: quit")
            && s.contains("more lines: a taller window shows them")
            && lines.iter().all(|l| l.chars().count() <= 50)
    });
    assert!(
        quits_on_q(&tmux, Duration::from_secs(5)),
        "{}",
        top_screen(&tmux)
    );
}

/// A real Prometheus (Debian's package), started on a loopback port, scraping every 100 ms.
struct Prometheus {
    child: std::process::Child,
    addr: String,
}

impl Prometheus {
    fn start(sb: &Sandbox, target: &str) -> Option<Prometheus> {
        Command::new("prometheus").arg("--version").output().ok()?;
        let cfg = sb.path("prometheus.yml");
        fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 100ms\n  scrape_timeout: 100ms\n\
                 scrape_configs:\n  - job_name: gearshift\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let child = spawn(
            Command::new("prometheus")
                .arg(format!("--config.file={}", cfg.display()))
                .arg(format!("--storage.tsdb.path={}", sb.path("tsdb").display()))
                .arg(format!("--web.listen-address={addr}"))
                .stdout(Stdio::null())
                .stderr(fs::File::create(sb.path("prometheus.log")).unwrap()),
        );
        let p = Prometheus { child, addr };
        eventually(Duration::from_secs(30), "prometheus ready", || {
            http_get(&p.addr, "/-/ready").is_ok_and(|(c, _)| c == 200)
        });
        Some(p)
    }

    /// An instant query's result vector.
    fn query(&self, q: &str) -> Vec<Value> {
        let enc: String = q
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (code, body) = http_get(&self.addr, &format!("/api/v1/query?query={enc}")).unwrap();
        assert_eq!(code, 200, "{q}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The single value of a query that yields one series.
    fn value(&self, q: &str) -> f64 {
        let r = self.query(q);
        assert_eq!(r.len(), 1, "{q}: {r:?}");
        r[0]["value"][1].as_str().unwrap().parse().unwrap()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scraping_every_100ms_through_50_reloads_sees_up_and_no_counter_reset() {
    let sb = Sandbox::new("prometheus");
    metrics_config(&sb, "");
    let w = sb.start();
    let target = metrics_addr(&w);
    let Some(prom) = Prometheus::start(&sb, &target) else {
        skip(
            "observability::prometheus_scraping_every_100ms_through_50_reloads_sees_up_and_no_counter_reset",
            "no prometheus (Debian's prometheus package)",
        );
        return;
    };
    eventually(Duration::from_secs(30), "first scrapes", || {
        prom.query("count_over_time(up[1m]) >= 5").len() == 1
    });
    let before = prom.value("count_over_time(up[5m])");
    // Jobs flow while the worker re-execs 50 times, at least 50 ms apart so that the storm
    // spans some 25 scrape intervals however fast this machine re-execs.
    let mut ids = Vec::new();
    let storm = Instant::now();
    for round in 0..50 {
        let next = Instant::now() + Duration::from_millis(50);
        ids.push(sb.submit("up", &format!("p{round}")));
        let g = w.generation();
        w.signal(Signal::SIGHUP);
        w.wait_generation(g + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let storm = storm.elapsed();
    all_outcomes(&sb, &ids, Duration::from_secs(30));
    // Scrapes of the last generation, then the end of the storm is in the database.
    std::thread::sleep(Duration::from_millis(1000));
    eventually(
        Duration::from_secs(10),
        "the last generation scraped",
        || {
            prom.query("max_over_time(gearshift_generation[5m]) == 51")
                .len()
                == 1
        },
    );
    let samples = prom.value("count_over_time(up[5m])");
    assert!(
        samples - before >= 15.0,
        "only {} scrapes during a storm of {storm:?}",
        samples - before
    );
    assert_eq!(prom.value("min_over_time(up[5m])"), 1.0, "a scrape failed");
    // No counter, histogram count or bucket ever went down, in any series.
    let (_, names) = http_get(&prom.addr, "/api/v1/label/__name__/values").unwrap();
    let names: Value = serde_json::from_str(&names).unwrap();
    let counters: Vec<&str> = names["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .filter(|n| {
            (n.starts_with("gearshift_")
                && (n.ends_with("_total") || n.ends_with("_count") || n.ends_with("_bucket")))
                || *n == "process_cpu_seconds_total"
        })
        .collect();
    assert!(counters.len() >= 8, "counters stored: {counters:?}");
    for name in counters {
        let reset = prom.query(&format!("resets({name}[5m]) > 0"));
        assert!(
            reset.is_empty(),
            "{name} went down in {} series: {}",
            reset.len(),
            reset[0]["metric"]
        );
    }
    assert_eq!(
        prom.value(r#"gearshift_jobs_total{function="up",outcome="done"}"#),
        50.0
    );
    assert_eq!(
        prom.value(r#"gearshift_restarts_total{reason="sighup"}"#),
        50.0
    );
}

/// A client that sends no request (an older `gearshift`) still gets the status document.
#[test]
fn a_client_that_asks_nothing_gets_the_status() {
    let sb = Sandbox::new("status-legacy");
    let w = sb.start();
    w.status();
    let mut c = std::os::unix::net::UnixStream::connect(&w.socket).unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    let doc: Value = serde_json::from_str(&s).unwrap();
    assert_eq!(doc["pid"], w.pid());
}

/// A worker of the version before the request line (it answers at once and closes with the
/// request unread, so the kernel resets the connection after the answer) is still read by
/// today's `status` and `reload`: played here by the test, holding the pidfile lock itself.
#[test]
fn status_reads_a_worker_that_does_not_read_requests() {
    let sb = Sandbox::new("status-old-worker");
    let doc = {
        let mut w = sb.start();
        let mut doc = w.status();
        let out = sb.run(&["stop"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        w.wait_exit(Duration::from_secs(10));
        doc["pid"] = std::process::id().into();
        doc
    };
    let pidfile = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(sb.path("state/gearshift.pid"))
        .unwrap();
    let mut lock =
        nix::fcntl::Flock::lock(pidfile, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
    writeln!(lock, "{}", std::process::id()).unwrap();
    let socket = sb.path("state/worker/gearshift.sock");
    let _ = fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        // Give the client's request time to arrive, so it is surely left unread.
        std::thread::sleep(Duration::from_millis(100));
        c.write_all(doc.to_string().as_bytes()).unwrap();
    });
    let out = sb.run(&["status", "--json"]);
    server.join().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["pid"], std::process::id());
    drop(lock);
}

/// `top` follows the worker: when it stops, top says so at once (no frozen frame, no raw socket
/// error) and waits; when a worker starts again (a new pid), top shows it. Without a terminal on
/// stdout it refuses (2) instead of drawing escapes into a pipe.
#[test]
fn top_follows_the_worker_across_a_stop_and_a_fresh_start() {
    if no_tmux("observability::top_follows_the_worker_across_a_stop_and_a_fresh_start") {
        return;
    }
    let sb = Sandbox::new("top-follow");
    let out = sb.run(&["top"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("terminal"),
        "{}",
        text(&out.stderr)
    );

    let mut w = sb.start();
    let (tmux, _server) = top_in_tmux(&sb, "gs-topf");
    let ten = Duration::from_secs(10);
    let first = w.pid();
    wait_screen(&tmux, "the first worker", ten, &|s| {
        s.contains(&format!("pid {first} "))
    });
    w.signal(nix::sys::signal::Signal::SIGTERM);
    w.wait_exit(ten);
    let stopped = Instant::now();
    wait_screen(&tmux, "the worker gone", ten, &|s| {
        s.contains("is gone") && s.contains("Waiting")
    });
    assert!(
        stopped.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopped.elapsed()
    );
    let w2 = sb.start();
    let second = w2.pid();
    wait_screen(&tmux, "the new worker", ten, &|s| {
        s.contains(&format!("pid {second} "))
    });
    assert!(
        quits_on_q(&tmux, Duration::from_secs(5)),
        "top did not quit:\n{}",
        top_screen(&tmux)
    );
}

/// A worker that holds its lock but answers nothing (stopped with SIGSTOP, Ctrl-Z at the
/// terminal of its `run`; wedged): `top` kept its last frame and asked again and again, and
/// looked at no key and no signal meanwhile, so neither `q` nor Ctrl-C ended it. Now it says
/// the worker does not answer (and that it is stopped, with `kill -CONT`), and quits on `q`.
#[test]
fn top_says_a_worker_that_answers_nothing_and_still_quits() {
    if no_tmux("observability::top_says_a_worker_that_answers_nothing_and_still_quits") {
        return;
    }
    let sb = Sandbox::new("top-stopped");
    let w = sb.start();
    let (tmux, _server) = top_in_tmux(&sb, "gs-tops");
    let pid = w.pid();
    wait_screen(&tmux, "the worker", Duration::from_secs(10), &|s| {
        s.contains(&format!("pid {pid} "))
    });
    w.signal(nix::sys::signal::Signal::SIGSTOP);
    let said = |s: &str| s.contains("does not answer") && s.contains(&format!("kill -CONT {pid}"));
    wait_screen(
        &tmux,
        "the worker said to answer nothing",
        Duration::from_secs(15),
        &said,
    );
    let quit = quits_on_q(&tmux, Duration::from_secs(8));
    let last = top_screen(&tmux);
    let _ = tmux(&["kill-server"]);
    w.signal(nix::sys::signal::Signal::SIGCONT);
    assert!(quit, "top did not quit on q:\n{last}");
}

/// `result` at a terminal ends the result with a newline, so the prompt (or the next command's
/// output) starts on a line of its own; to a pipe the bytes stay as stored (checked elsewhere).
#[test]
fn a_result_at_a_terminal_ends_its_line() {
    if no_tmux("observability::a_result_at_a_terminal_ends_its_line") {
        return;
    }
    let sb = Sandbox::new("result-tty");
    let id = sb.submit("echo", "no newline here");
    let _w = sb.start();
    all_outcomes(&sb, std::slice::from_ref(&id), Duration::from_secs(10));
    let server = format!("gs-result-{}", std::process::id());
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &server])
            .args(args)
            .output()
            .unwrap()
    };
    let cmd = format!(
        "{} -c {} result {id}; echo NEXT-LINE; sleep 30",
        sb.bin.display(),
        sb.config().display()
    );
    assert!(tmux(&["new-session", "-d", "-x", "120", "-y", "10", &cmd])
        .status
        .success());
    let mut screen = String::new();
    eventually(Duration::from_secs(10), "the output", || {
        screen = text(&tmux(&["capture-pane", "-p", "-t", "0"]).stdout);
        screen.contains("NEXT-LINE")
    });
    let _ = tmux(&["kill-server"]);
    assert!(
        screen.lines().any(|l| l.trim_end() == "no newline here")
            && screen.lines().any(|l| l.trim_end() == "NEXT-LINE"),
        "{screen}"
    );
}

/// `submit` with no payload at a terminal (the payload forgotten, or to be typed) waited for
/// standard input without a word, like a hang. It says where the payload comes from and how
/// to end it, and what is typed is the payload.
#[test]
fn submit_at_a_terminal_without_a_payload_says_how_to_end_it() {
    if no_tmux("observability::submit_at_a_terminal_without_a_payload_says_how_to_end_it") {
        return;
    }
    let sb = Sandbox::new("submit-tty");
    let _w = sb.start();
    let (tmux, _server) = in_tmux(&sb, "gs-submit-tty", "submit --wait reverse; sleep 30");
    wait_screen(&tmux, "the hint", Duration::from_secs(10), &|s| {
        s.contains("Ctrl-D")
    });
    tmux(&["send-keys", "-t", "0", "typed", "Enter"]);
    tmux(&["send-keys", "-t", "0", "C-d"]);
    wait_screen(&tmux, "the result", Duration::from_secs(10), &|s| {
        s.contains("depyt")
    });
    let _ = tmux(&["kill-server"]);
}

/// `submit` at a terminal of a job for a function the running worker does not have (a typo)
/// says so at once, with the functions it has: the job is queued all the same (a reload may
/// bring the function), and it would fail only when claimed. A pipe is not asked (scripts are
/// not slowed by the question), and a function the worker has is not said.
#[test]
fn submit_at_a_terminal_says_a_function_the_worker_does_not_have() {
    if no_tmux("observability::submit_at_a_terminal_says_a_function_the_worker_does_not_have") {
        return;
    }
    let sb = Sandbox::new("submit-typo");
    let _w = sb.start();
    let again = format!("{} -c {}", sb.bin.display(), sb.config().display());
    let (tmux, _server) = in_tmux(
        &sb,
        "gs-submit-typo",
        &format!(
            "submit revrese x; echo submitted=$?; {again} submit reverse y; echo again=$?; sleep 30"
        ),
    );
    wait_screen(&tmux, "both submits", Duration::from_secs(10), &|s| {
        s.contains("again=0")
    });
    let screen = top_screen(&tmux);
    let _ = tmux(&["kill-server"]);
    assert!(
        screen.contains("submitted=0"),
        "queued all the same:\n{screen}"
    );
    assert!(
        screen.contains("no function \"revrese\"") && screen.contains("reverse, sha256"),
        "{screen}"
    );
    assert_eq!(
        screen.matches("no function").count(),
        1,
        "said of the typo only:\n{screen}"
    );
    // To a pipe: the id alone.
    let out = sb.run(&["submit", "revrese", "x"]);
    assert!(out.status.success());
    assert!(
        !text(&out.stderr).contains("no function"),
        "{}",
        text_of(&out)
    );
}
