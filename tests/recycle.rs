//! Recycling: re-exec after max_jobs, max_rss_mb, max_age (leak containment).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

#[test]
fn max_jobs_recycles_about_every_n_jobs_and_loses_none() {
    let sb = Sandbox::new("max-jobs");
    sb.write_worker_config("max_jobs = 50\nrecycle_splay = 0.0");
    let w = sb.start();
    let spool = open_spool(&sb);
    let ids: Vec<String> = (0..500)
        .map(|i| spool.submit("echo", format!("j{i}").as_bytes()).unwrap())
        .collect();
    let outcomes = all_outcomes(&sb, &ids, Duration::from_secs(120));
    for (i, (done, result, attempts)) in outcomes.iter().enumerate() {
        assert_eq!(
            (*done, result.as_str(), *attempts),
            (true, format!("j{i}").as_str(), 1),
            "job {i}"
        );
    }
    let s = w.wait_for(Duration::from_secs(20), "all counted", |s| {
        s["jobs_completed"] == 500 && s["state"] == "running"
    });
    let g = s["generation"].as_u64().unwrap();
    assert!(
        (9..=11).contains(&g),
        "about 10 generations for 500 jobs at max_jobs = 50, got {g}"
    );
    assert_eq!(s["last_restart_reason"], "max_jobs");
    assert_eq!(s["pid"], w.pid());
}

#[test]
fn max_rss_recycles_a_leaking_worker() {
    let mut sb = Sandbox::new("max-rss");
    sb.bin = example("custom_worker");
    sb.write_worker_config("max_rss_mb = 40\nrecycle_splay = 0.0");
    let w = sb.start();
    let rss = |pid: i32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .unwrap()
            .trim()
            .trim_end_matches(" kB")
            .parse::<u64>()
            .unwrap()
            >> 10
    };
    assert!(rss(w.pid()) < 40, "starts small");
    let out = sb.run(&["submit", "--wait", "leak", "64"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "leaked 64 MiB");
    let s = w.wait_generation(2);
    assert_eq!(s["last_restart_reason"], "max_rss");
    assert!(
        rss(w.pid()) < 40,
        "the leak is gone after the recycle: {} MiB",
        rss(w.pid())
    );
}

/// A `max_rss_mb` below what a fresh generation uses (1 MiB, or 4 on a guess) made every
/// job end in a re-exec: the new generation starts as large, so recycling cannot bring it under
/// the limit. Now that limit is off for the generation, and said in the log and `status`.
#[test]
fn a_max_rss_below_a_fresh_generation_is_said_and_does_not_restart_after_every_job() {
    let sb = Sandbox::new("max-rss-floor");
    sb.write_worker_config("max_rss_mb = 1\nrecycle_splay = 0.0");
    let w = sb.start();
    let spool = open_spool(&sb);
    let ids: Vec<String> = (0..20)
        .map(|i| spool.submit("echo", format!("j{i}").as_bytes()).unwrap())
        .collect();
    let outcomes = all_outcomes(&sb, &ids, Duration::from_secs(60));
    assert!(outcomes.iter().all(|(done, _, _)| *done), "{outcomes:?}");
    let s = w.wait_for(Duration::from_secs(20), "all counted", |s| {
        s["jobs_completed"] == 20 && s["state"] == "running"
    });
    assert_eq!(
        s["generation"], 1,
        "no recycle for a limit no generation can meet"
    );
    assert!(has_warning(&s, "max_rss_mb = 1 is below"), "{s}");
    assert!(
        w.log_text().contains("max_rss_mb = 1 is below"),
        "{}",
        w.log_text()
    );
}

#[test]
fn max_age_recycles_an_old_generation() {
    let sb = Sandbox::new("max-age");
    sb.write_worker_config("max_age = \"1s\"\nrecycle_splay = 0.0");
    let w = sb.start();
    let s = w.wait_generation(2);
    assert_eq!(s["last_restart_reason"], "max_age");
    let s = w.wait_generation(3);
    assert_eq!(s["last_restart_reason"], "max_age");
}

/// With a bad config on disk, a recycle is refused once, and the worker serves on: lanes do not
/// ask again for every later job (they once did, each time restarting every lane).
#[test]
fn a_refused_recycle_is_asked_once_and_serving_goes_on() {
    let sb = Sandbox::new("recycle-refused");
    sb.write_worker_config("max_jobs = 5\nrecycle_splay = 0.0\nwatch_config = false");
    let w = sb.start();
    // A generation looks at its files once as it starts serving: the bad config goes in after
    // that look (a write before it was refused by the look too: 2 refusals, on a loaded CI).
    w.wait_for(
        Duration::from_secs(10),
        "the first look at the files",
        |s| s["file_checks"].as_u64().unwrap_or(0) >= 1,
    );
    let good = std::fs::read_to_string(sb.config()).unwrap();
    std::fs::write(sb.config(), format!("{good}\nnot toml at all\n")).unwrap();
    let spool = open_spool(&sb);
    let ids: Vec<String> = (0..30)
        .map(|i| spool.submit("echo", format!("r{i}").as_bytes()).unwrap())
        .collect();
    let outcomes = all_outcomes(&sb, &ids, Duration::from_secs(60));
    assert!(outcomes.iter().all(|(done, _, _)| *done));
    let s = w.wait_for(Duration::from_secs(10), "all counted", |s| {
        s["jobs_completed"] == 30
    });
    assert_eq!(s["generation"], 1, "{s}");
    assert_eq!(
        s["reload_refusals"], 1,
        "refused once, not once per job: {s}"
    );
    assert_eq!(s["last_refused_reload"]["reason"], "max_jobs");
}
