//! Hot restart in place: SIGHUP, config and jobs_dir changes, signal storms, fd leaks, stops.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

#[test]
fn hup_during_a_long_job_loses_nothing() {
    let sb = Sandbox::new("hup-long");
    let w = sb.start();
    let long = sb.submit("sleep", "2000");
    w.wait_for(Duration::from_secs(10), "the sleep job to run", |s| {
        s["in_flight"] == 1
    });

    let spool = open_spool(&sb);
    let mut ids: Vec<String> = (0..100)
        .map(|i| spool.submit("echo", format!("a{i}").as_bytes()).unwrap())
        .collect();
    w.signal(Signal::SIGHUP);
    ids.extend((0..100).map(|i| spool.submit("echo", format!("b{i}").as_bytes()).unwrap()));

    let s = w.wait_generation(2);
    assert_eq!(s["pid"], w.pid(), "same PID after the re-exec");
    assert_eq!(s["last_restart_reason"], "sighup");

    let outcomes = all_outcomes(&sb, &ids, Duration::from_secs(60));
    for (i, (done, result, attempts)) in outcomes.iter().enumerate() {
        let want = if i < 100 {
            format!("a{i}")
        } else {
            format!("b{}", i - 100)
        };
        assert!(done, "job {i} failed: {result}");
        assert_eq!((result.as_str(), *attempts), (want.as_str(), 1), "job {i}");
    }
    let long = all_outcomes(&sb, &[long], Duration::from_secs(10));
    assert_eq!(
        long[0],
        (true, "2000".to_string(), 1),
        "the long job completed once"
    );
    let s = w.wait_for(Duration::from_secs(10), "counters", |s| {
        s["jobs_completed"] == 201
    });
    assert_eq!(s["jobs_failed"], 0);
    assert_eq!(s["generation"], 2, "one HUP, one restart");
}

#[test]
fn config_edits_in_place_and_by_rename_each_restart_once() {
    let sb = Sandbox::new("cfg-edit");
    let w = sb.start();
    assert_eq!(w.generation(), 1);

    // In place: truncate and write the same file (what `echo >>` or many editors do).
    fs::write(sb.config(), sb.config_text("# edit 1\n")).unwrap();
    let s = w.wait_generation(2);
    assert_eq!(s["last_restart_reason"], "config changed");
    // The new generation looks at the files as it starts (events of the edit that arrived
    // during the restart included): seen and judged, no second restart.
    let s = w.wait_for(Duration::from_secs(10), "the new generation's look", |s| {
        s["file_checks"].as_u64().unwrap_or(0) >= 1
    });
    assert_eq!(
        s["generation"], 2,
        "exactly one restart for one in-place edit"
    );

    // Atomic rename over the file (what vim, sed -i and deploy tools do).
    let tmp = sb.path("config.toml.new");
    fs::write(&tmp, sb.config_text("# edit 2\n")).unwrap();
    fs::rename(&tmp, sb.config()).unwrap();
    let s = w.wait_generation(3);
    assert_eq!(s["last_restart_reason"], "config changed");
    let s = w.wait_for(Duration::from_secs(10), "the new generation's look", |s| {
        s["file_checks"].as_u64().unwrap_or(0) >= 1
    });
    assert_eq!(s["generation"], 3, "exactly one restart for one rename");

    // Touching the file without changing its bytes is not a change: once the worker has
    // looked at it (the check count grows), the generation is the same.
    let before = s["file_checks"].as_u64().unwrap();
    fs::write(sb.config(), sb.config_text("# edit 2\n")).unwrap();
    let s = w.wait_for(Duration::from_secs(10), "the touch seen", |s| {
        s["file_checks"].as_u64().unwrap_or(0) > before
    });
    assert_eq!(s["generation"], 3, "same content, no restart");
    assert_eq!(w.status()["pid"], w.pid());
}

#[test]
fn symlinked_config_swap_is_seen() {
    // The Kubernetes ConfigMap layout: config.toml -> ..data/config.toml, ..data -> v1.
    let sb = Sandbox::new("cfg-symlink");
    let conf = sb.path("conf");
    // Relative paths stay relative to the directory of the path gearshift was given.
    for v in ["v1", "v2"] {
        fs::create_dir_all(conf.join(v)).unwrap();
        fs::write(
            conf.join(v).join("config.toml"),
            sb.config_text(&format!("# {v}\n")),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("v1", conf.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/config.toml", conf.join("config.toml")).unwrap();
    fs::remove_file(sb.config()).unwrap();
    std::os::unix::fs::symlink("conf/config.toml", sb.config()).unwrap();

    let w = sb.start();
    std::os::unix::fs::symlink("v2", conf.join("..data_tmp")).unwrap();
    fs::rename(conf.join("..data_tmp"), conf.join("..data")).unwrap();
    let s = w.wait_generation(2);
    assert_eq!(s["last_restart_reason"], "config changed");
}

/// The config's directory replaced whole (moved away and made again, as deploy and config
/// management tools do): the watch stayed on the old directory, so every later edit of the
/// config went unnoticed, for the life of the generation. Now the watched directories are
/// looked at again (on any event, and every 5 s): one that is not at its path any more is
/// watched anew, and the config looked at.
#[test]
fn a_config_directory_replaced_whole_is_watched_anew() {
    let sb = Sandbox::new("cfg-dir-swap");
    let etc = sb.path("etc");
    fs::create_dir(&etc).unwrap();
    fs::write(etc.join("config.toml"), sb.config_text("")).unwrap();
    fs::remove_file(sb.config()).unwrap();
    std::os::unix::fs::symlink("etc/config.toml", sb.config()).unwrap();
    let w = sb.start();
    fs::rename(&etc, sb.path("etc.old")).unwrap();
    fs::create_dir(&etc).unwrap();
    fs::copy(sb.path("etc.old/config.toml"), etc.join("config.toml")).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(w.generation(), 1, "the same content: no restart");
    fs::write(etc.join("config.toml"), sb.config_text("# changed\n")).unwrap();
    let s = w.wait_generation(2);
    assert_eq!(s["last_restart_reason"], "config changed");
}

/// The deploy tools' layout (Capistrano, Deployer): each release in a directory of its own,
/// and a `current` link swapped to the new one. That link is a directory on the paths of the
/// config and of `jobs_dir`, not their last part, and its own directory was not watched: a
/// switch was seen only when the watched directories were looked at again (every 5 s). Each
/// switch here comes 5 s before that look (just after an event in the watched config directory
/// made one), and must be seen well before it.
#[test]
fn a_release_switch_is_seen_at_once() {
    let sb = Sandbox::new("cfg-release");
    let app = sb.path("app");
    let config = sb
        .config_text("")
        .replace("jobs_dir = \"jobs\"", "jobs_dir = \"app/current/jobs\"");
    for (release, extra, output) in [
        (1, "# r1\n", "one"),
        (2, "# r2\n", "two"),
        (3, "# r2\n", "three"),
    ] {
        let dir = app.join(format!("releases/{release}"));
        fs::create_dir_all(dir.join("jobs")).unwrap();
        fs::write(dir.join("config.toml"), format!("{config}{extra}")).unwrap();
        let job = dir.join("jobs/hello");
        fs::write(&job, format!("#!/bin/sh\necho {output}\n")).unwrap();
        fs::set_permissions(&job, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let switch = |release: u32| {
        let tmp = app.join("current.new");
        std::os::unix::fs::symlink(format!("releases/{release}"), &tmp).unwrap();
        fs::rename(&tmp, app.join("current")).unwrap();
    };
    switch(1);
    fs::remove_file(sb.config()).unwrap();
    std::os::unix::fs::symlink("app/current/config.toml", sb.config()).unwrap();
    let w = sb.start();
    let hello = || text(&sb.run(&["submit", "--wait", "hello", "x"]).stdout);
    assert_eq!(hello(), "one\n");
    for (release, generation, reason, output) in [
        (2, 2, "config changed", "two\n"),
        (3, 3, "jobs changed", "three\n"),
    ] {
        // An event in the watched config directory: the directories are looked at again now,
        // and next in 5 s.
        let before = w.status()["file_checks"].as_u64().unwrap();
        fs::write(app.join("current/notes"), "x").unwrap();
        w.wait_for(Duration::from_secs(10), "the event looked at", |s| {
            s["file_checks"].as_u64().unwrap_or(0) > before
        });
        switch(release);
        let s = w.wait_for(
            Duration::from_millis(3500),
            &format!("release {release} seen at once, not at the next look 5 s on"),
            |s| s["generation"].as_u64().unwrap_or(0) >= generation && s["state"] == "running",
        );
        assert_eq!(s["last_restart_reason"], reason);
        assert_eq!(hello(), output);
    }
}

/// config.toml written in place in two parts, as a slow copy or a paste does: `whole` up to
/// `cut` now, the rest (and the close) at [`SlowWrite::finish`].
struct SlowWrite {
    file: fs::File,
    rest: Vec<u8>,
}

impl SlowWrite {
    fn begin(sb: &Sandbox, whole: &str, cut: usize) -> SlowWrite {
        use std::io::Write;
        let mut file = fs::File::create(sb.config()).unwrap();
        file.write_all(&whole.as_bytes()[..cut]).unwrap();
        SlowWrite {
            file,
            rest: whole.as_bytes()[cut..].to_vec(),
        }
    }

    fn finish(mut self) {
        use std::io::Write;
        self.file.write_all(&self.rest).unwrap();
    }
}

/// Where a config's text is cut right after `key = `: a prefix that does not parse.
fn after(whole: &str, key: &str) -> usize {
    whole.find(key).unwrap() + key.len()
}

/// A config written in place slowly (a transfer tool writing over the file, a person pasting
/// into `cat > config.toml`): a prefix that is a valid config on its own (here: without
/// `[source]`, so a spool on its defaults) was restarted onto, once the writer paused longer
/// than the debounce, and the whole one a second restart later. Now the file is judged once
/// its writer closes it.
#[test]
fn a_config_written_in_place_slowly_is_judged_once_its_writer_closes_it() {
    let sb = Sandbox::new("cfg-slow-write");
    let w = sb.start();
    let whole = sb.config_text("# the whole file\n");
    let write = SlowWrite::begin(&sb, &whole, whole.find("[source]").unwrap());
    std::thread::sleep(Duration::from_millis(1500));
    write.finish();
    let s = w.wait_generation(2);
    assert_eq!(s["last_restart_reason"], "config changed");
    std::thread::sleep(Duration::from_millis(1500));
    let s = w.status();
    assert_eq!(
        s["generation"],
        2,
        "one restart, onto the whole file:\n{}",
        w.log_text()
    );
    assert_eq!(s["config_sha256"], sha256_hex(whole.as_bytes()), "{s}");
}

/// A slow in-place write of config.toml that begins while a HUP's restart waits for a long
/// job: the exec reads the config once the writer has closed it, not the part written when the
/// job ended (a prefix that parses: the file without its `[source]`).
#[test]
fn a_restart_draining_while_the_config_is_written_slowly_reads_it_once_closed() {
    let sb = Sandbox::new("cfg-slow-drain");
    let w = sb.start();
    let long = sb.submit("sleep", "1000");
    w.wait_for(Duration::from_secs(10), "the sleep job to run", |s| {
        s["in_flight"] == 1
    });
    w.signal(Signal::SIGHUP);
    w.wait_for(Duration::from_secs(10), "the drain", |s| {
        s["state"] == "draining"
    });
    let whole = sb.config_text("# the whole file, written during a drain\n");
    let write = SlowWrite::begin(&sb, &whole, whole.find("[source]").unwrap());
    // The job ends while the writer pauses.
    std::thread::sleep(Duration::from_millis(2000));
    write.finish();
    let s = w.wait_generation(2);
    assert_eq!(s["last_restart_reason"], "sighup");
    std::thread::sleep(Duration::from_millis(1500));
    let s = w.status();
    assert_eq!(
        (&s["generation"], &s["config_sha256"]),
        (&2.into(), &sha256_hex(whole.as_bytes()).into()),
        "one restart, onto the whole file:\n{}",
        w.log_text()
    );
    let long = all_outcomes(&sb, &[long], Duration::from_secs(5));
    assert_eq!(long[0], (true, "1000".to_string(), 1), "not interrupted");
    assert!(
        w.log_text()
            .contains("the restart reads it once its writer closes it"),
        "{}",
        w.log_text()
    );
}

/// A HUP while config.toml is being written in place and the part written does not parse yet:
/// the reload waits for the writer's close and restarts onto the whole file, once, where it
/// refused the half-written file and then restarted again for the change.
#[test]
fn a_hup_while_the_config_is_written_slowly_waits_for_its_close() {
    let sb = Sandbox::new("cfg-slow-hup");
    let w = sb.start();
    let whole = sb.config_text("# written while a HUP came\n");
    let write = SlowWrite::begin(&sb, &whole, after(&whole, "concurrency = "));
    std::thread::sleep(Duration::from_millis(300));
    w.signal(Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(1500));
    write.finish();
    w.wait_generation(2);
    std::thread::sleep(Duration::from_millis(1500));
    let s = w.status();
    let log = w.log_text();
    assert_eq!(
        (
            &s["generation"],
            &s["config_sha256"],
            &s["last_restart_reason"]
        ),
        (
            &2.into(),
            &sha256_hex(whole.as_bytes()).into(),
            &"sighup".into()
        ),
        "one restart, the HUP's, onto the whole file:\n{log}"
    );
    assert!(!log.contains("reload refused"), "{log}");
}

/// A config written in place slowly as the worker starts (here: its control loop held back
/// until the write began, in a fault build; in CI, a busy machine): the loop's first look at
/// the files, made at once, read the half-written file before the watch's report of the
/// writer reached it, and refused it ("a value is missing after `=`"). Now the first look
/// waits a debounce, as every other look does, and the file is judged once it is closed.
#[test]
fn a_config_written_as_the_worker_starts_is_judged_once_closed() {
    let mut sb = Sandbox::new("cfg-slow-start");
    sb.bin = build_variant("faults", ("GEARSHIFT_FAULTS", "1"));
    let marker = sb.path("stall");
    fs::write(&marker, "").unwrap();
    let w = sb.start_env(&[("GEARSHIFT_FAULT_STALL_LOOP", marker.to_str().unwrap())]);
    let whole = sb.config_text("# written as the worker started\n");
    let write = SlowWrite::begin(&sb, &whole, after(&whole, "concurrency = "));
    std::thread::sleep(Duration::from_millis(300));
    fs::remove_file(&marker).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    write.finish();
    w.wait_generation(2);
    std::thread::sleep(Duration::from_millis(1000));
    let s = w.status();
    let log = w.log_text();
    assert_eq!(
        (&s["generation"], &s["config_sha256"]),
        (&2.into(), &sha256_hex(whole.as_bytes()).into()),
        "one restart, onto the whole file:\n{log}"
    );
    assert!(!log.contains("reload refused"), "{log}");
}

/// A change waiting out `restart_splay` when a slow in-place write of the config begins: the
/// splay ends no sooner than the writer's close, so the half-written file (which does not
/// parse) is never judged and refused; the restart reads the whole.
#[test]
fn a_splayed_restart_waits_for_a_config_being_written() {
    let sb = Sandbox::new("cfg-slow-splay");
    sb.write_worker_config("restart_splay = \"1s\"");
    let w = sb.start();
    let text = |extra: &str| {
        let plain = sb.config_text(extra);
        plain.replace(
            "allow_root = true\n",
            "allow_root = true\nrestart_splay = \"1s\"\n",
        )
    };
    // A splay drawn too short to begin the write within is tried again (each 1 in 100 or so).
    let mut generation = 1;
    for edit in 0.. {
        fs::write(sb.config(), text(&format!("# edit {edit}\n"))).unwrap();
        let s = w.wait_for(Duration::from_secs(10), "the splayed restart", |s| {
            !s["restart_pending"].is_null() || s["generation"] != generation
        });
        if s["generation"] == generation {
            break;
        }
        generation = s["generation"].as_u64().unwrap();
    }
    let whole = text("# second edit, written slowly\n");
    let write = SlowWrite::begin(&sb, &whole, after(&whole, "concurrency = "));
    // The splay (at most 1 s) ends while the writer pauses.
    std::thread::sleep(Duration::from_millis(2000));
    write.finish();
    w.wait_generation(generation + 1);
    std::thread::sleep(Duration::from_millis(1500));
    let s = w.status();
    let log = w.log_text();
    assert_eq!(
        (&s["generation"], &s["config_sha256"]),
        (
            &(generation + 1).into(),
            &sha256_hex(whole.as_bytes()).into()
        ),
        "one restart, onto the whole file:\n{log}"
    );
    assert!(!log.contains("reload refused"), "{log}");
}

/// A writer that never closes the config (it keeps it open and writes no more) holds the look
/// for at most 10 s: then the file is judged as it is.
#[test]
fn a_config_held_open_for_writing_is_judged_after_a_bound() {
    let sb = Sandbox::new("cfg-held-open");
    let w = sb.start();
    let whole = sb.config_text("# written, never closed\n");
    let write = SlowWrite::begin(&sb, &whole, whole.len());
    let s = w.wait_generation(2);
    assert_eq!(s["config_sha256"], sha256_hex(whole.as_bytes()), "{s}");
    let log = w.log_text();
    assert!(
        log.contains("is open for writing: judged once its writer closes it")
            && log.contains("has been open for writing for 10 s: judged as it is"),
        "{log}"
    );
    write.finish();
}

#[test]
fn invalid_config_is_refused_and_serving_goes_on() {
    let sb = Sandbox::new("cfg-bad");
    let w = sb.start();
    fs::write(sb.config(), "[worker]\nconcurency = 3\n").unwrap();
    let s = w.wait_for(Duration::from_secs(10), "the refusal", |s| {
        !s["last_refused_reload"].is_null()
    });
    let err = s["last_refused_reload"]["error"].as_str().unwrap();
    assert!(
        err.ends_with(
            "config.toml:2:1: unknown key \"concurency\" (did you mean \"concurrency\"?)"
        ),
        "{err}"
    );
    assert_eq!(s["generation"], 1);
    assert_eq!(s["state"], "running");

    // Still serving (the CLI cannot submit with this config, the library can).
    let id = open_spool(&sb).submit("reverse", b"abc").unwrap();
    assert_eq!(
        all_outcomes(&sb, &[id], Duration::from_secs(10))[0],
        (true, "cba".into(), 1)
    );

    // An explicit reload is refused too, with the reason, and exit 1.
    let out = sb.run(&["reload"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("did you mean \"concurrency\""));
    assert_eq!(w.generation(), 1);

    // Fixed: the worker picks it up.
    sb.write_config("# fixed\n");
    let s = w.wait_generation(2);
    assert_eq!(s["last_restart_reason"], "config changed");
}

#[test]
fn new_job_executable_becomes_a_function() {
    let sb = Sandbox::new("jobs-add");
    let w = sb.start();
    assert!(!w.status()["functions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "shout"));
    sb.job("shout.sh", "#!/bin/sh\ntr a-z A-Z\n");
    let s = w.wait_generation(2);
    assert_eq!(s["last_restart_reason"], "jobs changed");
    assert!(
        s["functions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "shout"),
        "{s}"
    );
    let id = sb.submit("shout", "hey");
    assert_eq!(
        all_outcomes(&sb, &[id], Duration::from_secs(10))[0],
        (true, "HEY".into(), 1)
    );

    // Removing it is a change as well.
    fs::remove_file(sb.path("jobs/shout.sh")).unwrap();
    let s = w.wait_generation(3);
    assert!(!s["functions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "shout"));
}

#[test]
fn hup_storm_under_load_loses_nothing() {
    let sb = Sandbox::new("hup-storm");
    let w = sb.start();
    let pid = w.pid();
    let submitter = {
        let spool_dir = sb.path("spool");
        std::thread::spawn(move || {
            let spool = gearshift::client::spool::Spool::open(&spool_dir, false).unwrap();
            (0..400)
                .map(|i| {
                    if i % 4 == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    spool
                        .submit("reverse", format!("job{i}").as_bytes())
                        .unwrap()
                })
                .collect::<Vec<_>>()
        })
    };
    for _ in 0..200 {
        w.signal(Signal::SIGHUP);
        std::thread::sleep(Duration::from_millis(1));
    }
    let ids = submitter.join().unwrap();
    let outcomes = all_outcomes(&sb, &ids, Duration::from_secs(120));
    for (i, (done, result, attempts)) in outcomes.iter().enumerate() {
        let want: String = format!("job{i}").chars().rev().collect();
        assert!(done, "job {i}: {result}");
        assert_eq!((result.as_str(), *attempts), (want.as_str(), 1), "job {i}");
    }
    let mut w = w;
    assert!(
        w.child.try_wait().unwrap().is_none(),
        "worker died:\n{}",
        w.log_text()
    );
    let s = w.wait_for(Duration::from_secs(30), "the storm to settle", |s| {
        s["state"] == "running"
    });
    assert_eq!(s["pid"], pid);
    assert!(s["generation"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(s["jobs_completed"], 400);
}

#[test]
fn no_descriptor_leaks_over_100_reexecs() {
    let sb = Sandbox::new("fd-leak");
    let w = sb.start();
    w.signal(Signal::SIGHUP);
    w.wait_generation(2);
    // The binary is hashed in the background (its descriptor open meanwhile): sample after.
    w.wait_hashed();
    let before = w.fd_count();
    let before_list = w.fd_list();
    for g in 3..=102 {
        w.signal(Signal::SIGHUP);
        w.wait_generation(g);
    }
    let after = w.fd_count();
    assert_eq!(
        before,
        after,
        "descriptors before and after 100 re-execs:\n{before_list}\n---\n{}",
        w.fd_list()
    );
    assert_eq!(w.status()["pid"], w.pid());
    // Job processes see only stdin, stdout, stderr and the progress channel.
    // (Python, not sh: dash keeps its script open on fd 10.)
    sb.job(
        "fds.py",
        "#!/usr/bin/env python3\nimport os\nfds = []\nfor fd in sorted(int(f) for f in os.listdir('/proc/self/fd')):\n    try:\n        os.readlink(f'/proc/self/fd/{fd}')\n        fds.append(str(fd))\n    except OSError:\n        pass  # the listing's own descriptor, closed by now\nprint(' '.join(fds), end='')\n",
    );
    w.wait_generation(103);
    let id = sb.submit("fds", "");
    let (done, fds, _) = all_outcomes(&sb, &[id], Duration::from_secs(10)).remove(0);
    assert!(done);
    assert_eq!(fds.trim(), "0 1 2 3", "descriptors a job inherits");
}

/// The status socket is bound once and handed across every exec: a query sent while the worker
/// restarts waits in its backlog and is answered by the next generation, never refused (before,
/// each generation bound it anew, and a query in between found no listener).
#[test]
fn status_queries_during_restarts_are_all_answered() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    let sb = Sandbox::new("status-carried");
    let w = sb.start();
    w.status();
    let ident = || {
        use std::os::unix::fs::MetadataExt;
        let m = fs::symlink_metadata(&w.socket).unwrap();
        (m.dev(), m.ino())
    };
    let first = ident();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let asker = {
        let (stop, socket) = (std::sync::Arc::clone(&stop), w.socket.clone());
        std::thread::spawn(move || {
            let (mut answered, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let asked = std::os::unix::net::UnixStream::connect(&socket).and_then(|mut c| {
                    c.set_read_timeout(Some(Duration::from_secs(5)))?;
                    c.write_all(b"counts\n")?;
                    let mut body = Vec::new();
                    c.read_to_end(&mut body)?;
                    Ok(body)
                });
                match asked {
                    Ok(body) if body.starts_with(b"{") => answered += 1,
                    Ok(body) => failed.push(format!("answer {:?}", String::from_utf8_lossy(&body))),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (answered, failed)
        })
    };
    for g in 2..=21 {
        w.signal(Signal::SIGHUP);
        w.wait_generation(g);
    }
    stop.store(true, Ordering::Relaxed);
    let (answered, failed) = asker.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} queries failed: {failed:?}",
        failed.len(),
        answered as usize + failed.len()
    );
    assert!(answered > 20, "{answered} queries answered");
    assert_eq!(ident(), first, "the socket bound at the first start");
}

/// The exec uses the plan validated at the HUP only while no file was touched since: a job
/// added while the restart drains is served by the very next generation (looked at again before
/// the exec), not one restart later.
#[test]
fn a_job_added_during_the_drain_is_served_by_the_next_generation() {
    let sb = Sandbox::new("drain-edit");
    let w = sb.start();
    let id = sb.submit("sleep", "1500");
    w.wait_for(Duration::from_secs(10), "the job to run", |s| {
        s["in_flight"] == 1
    });
    w.signal(Signal::SIGHUP);
    w.wait_for(Duration::from_secs(10), "draining", |s| {
        s["state"] == "draining"
    });
    sb.job("late.sh", "#!/bin/sh\necho late\n");
    let s = w.wait_generation(2);
    let functions = s["functions"].as_array().unwrap();
    assert!(
        functions.iter().any(|f| f == "late"),
        "generation 2 serves late: {s}"
    );
    assert_eq!(s["restarts"], 1, "{s}");
    let late = sb.submit("late", "");
    let outcomes = all_outcomes(&sb, &[id, late], Duration::from_secs(10));
    assert!(outcomes.iter().all(|(done, _, _)| *done), "{outcomes:?}");
    assert_eq!(outcomes[1].1.trim(), "late");
}

#[test]
fn term_lets_the_running_job_finish_then_exits_0() {
    let sb = Sandbox::new("term");
    let mut w = sb.start();
    let id = sb.submit("sleep", "700");
    w.wait_for(Duration::from_secs(10), "the job to run", |s| {
        s["in_flight"] == 1
    });
    w.signal(Signal::SIGTERM);
    let status = w.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "log:\n{}", w.log_text());
    assert_eq!(
        all_outcomes(&sb, &[id], Duration::from_secs(1))[0],
        (true, "700".into(), 1)
    );
    assert_eq!(sb.run(&["status"]).status.code(), Some(3));
}

#[test]
fn second_term_exits_at_once_and_the_job_runs_again() {
    let sb = Sandbox::new("term2");
    let mut w = sb.start();
    let id = sb.submit("sleep", "3000");
    w.wait_for(Duration::from_secs(10), "the job to run", |s| {
        s["in_flight"] == 1
    });
    w.signal(Signal::SIGTERM);
    w.wait_for(Duration::from_secs(10), "stopping", |s| {
        s["state"] == "stopping"
    });
    w.signal(Signal::SIGINT);
    let status = w.wait_exit(Duration::from_secs(2));
    // Ended by the signal, as a shell expects of Ctrl-C (130), not exit 1 (a crash to a
    // supervisor or to systemd's Restart=on-failure).
    let by = std::os::unix::process::ExitStatusExt::signal(&status);
    assert_eq!(by, Some(Signal::SIGINT as i32), "{status:?}");
    assert!(
        outcome(&open_spool(&sb), &id).is_none(),
        "the interrupted job is not finished"
    );

    let _w = sb.start();
    assert_eq!(
        all_outcomes(&sb, &[id], Duration::from_secs(20))[0],
        (true, "3000".into(), 2)
    );
}

#[test]
fn kill_9_mid_job_then_run_again_reruns_it() {
    let sb = Sandbox::new("kill9");
    let mut w = sb.start();
    let id = sb.submit("sleep", "1000");
    w.wait_for(Duration::from_secs(10), "the job to run", |s| {
        s["in_flight"] == 1
    });
    w.signal(Signal::SIGKILL);
    w.wait_exit(Duration::from_secs(5));
    // The stale pidfile of the killed worker is taken over.
    let _w = sb.start();
    assert_eq!(
        all_outcomes(&sb, &[id], Duration::from_secs(20))[0],
        (true, "1000".into(), 2)
    );
}

#[test]
fn reload_command_reports_the_new_generation() {
    let sb = Sandbox::new("reload-cli");
    let w = sb.start();
    let out = sb.run(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("reloaded: generation 2 (pid {})", w.pid())
    );
    let s = w.status();
    assert!(s["last_restart_pause_us"].is_null() || s["last_restart_pause_us"].as_u64().is_some());

    let out = sb.run(&["status"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("(pid {}), generation 2", w.pid())),
        "{text}"
    );

    let out = sb.run(&["stop"]);
    assert!(out.status.success());
    assert_eq!(sb.run(&["status"]).status.code(), Some(3));
    assert_eq!(sb.run(&["reload"]).status.code(), Some(3));
}

/// `restart_splay` delays a restart caused by a change (which may reach a whole fleet at once)
/// by a random fraction of it; the worker serves meanwhile. A HUP is never delayed, and takes
/// the pending restart along.
#[test]
fn change_restarts_are_splayed_and_a_hup_is_not() {
    let sb = Sandbox::new("splay");
    sb.write_worker_config("restart_splay = \"1h\"");
    let w = sb.start();
    let text = fs::read_to_string(sb.config()).unwrap();
    fs::write(sb.config(), format!("{text}# edit 1\n")).unwrap();
    let s = w.wait_for(Duration::from_secs(10), "a pending restart", |s| {
        s["restart_pending"]["reason"] == "config changed"
    });
    assert_eq!(s["generation"], 1, "not restarted at once");
    // Still serving while the restart waits.
    let id = sb.submit("echo", "served");
    assert_eq!(
        all_outcomes(&sb, std::slice::from_ref(&id), Duration::from_secs(10))[0].1,
        "served"
    );
    w.signal(Signal::SIGHUP);
    let s = w.wait_generation(2);
    assert_eq!(s["last_restart_reason"], "sighup");
    assert!(s["restart_pending"].is_null(), "{s}");
    assert_eq!(s["config_sha256"].as_str().map(str::len), Some(64));

    // A short splay: the restart comes, not before the time it said.
    let text = fs::read_to_string(sb.config())
        .unwrap()
        .replace("restart_splay = \"1h\"", "restart_splay = \"1500ms\"");
    fs::write(sb.config(), &text).unwrap();
    // That edit itself restarts with the old splay (1h) pending: push it with a HUP.
    w.wait_for(Duration::from_secs(10), "pending", |s| {
        s["restart_pending"].is_object()
    });
    w.signal(Signal::SIGHUP);
    w.wait_generation(3);
    fs::write(sb.config(), format!("{text}# edit 2\n")).unwrap();
    // A splay drawn shorter than a status query's round may be over before one sees it
    // pending (CI once drew 3 ms of the 1500).
    let pending = w.wait_for(Duration::from_secs(10), "a pending restart", |s| {
        s["restart_pending"].is_object() || s["generation"] == 4
    });
    let s = w.wait_generation(4);
    assert_eq!(s["last_restart_reason"], "config changed");
    match pending["restart_pending"]["at"].as_str() {
        Some(at) => {
            let restarted = s["restarted_at"].as_str().unwrap();
            // RFC 3339 UTC with milliseconds: lexical order is time order.
            assert!(restarted >= at, "restarted {restarted}, due {at}");
        }
        None => assert!(
            w.log_text().contains("g3 config changed: restarting in "),
            "{}",
            w.log_text()
        ),
    }
}

/// A generation that shows its first claim also shows its restart pause (the pause is stored
/// before the lanes start): across 20 reloads with jobs queued, never a claim without a pause.
#[test]
fn a_claim_after_a_restart_always_comes_with_its_pause() {
    let sb = Sandbox::new("pause-order");
    // Many lanes: spawning them takes a while, and the first claims meanwhile.
    sb.write_worker_config("");
    let cfg = std::fs::read_to_string(sb.config())
        .unwrap()
        .replace("concurrency = 2", "concurrency = 32");
    std::fs::write(sb.config(), cfg).unwrap();
    let w = sb.start();
    let spool = open_spool(&sb);
    for g in 2..=21u64 {
        // Jobs waiting (200 ms each: the old generation cannot drain them before it stops
        // claiming, even when a busy disk makes the submit slow), so the new generation
        // claims at once.
        let jobs = vec![("sleep", &b"200"[..]); 100];
        spool.submit_batch(&jobs).unwrap();
        w.signal(nix::sys::signal::Signal::SIGHUP);
        let s = w.wait_for(
            Duration::from_secs(10),
            "the new generation's first claim",
            |s| {
                s["generation"].as_u64() >= Some(g)
                    && s["first_claim_monotonic_us"].as_u64() > Some(0)
            },
        );
        assert!(
            s["last_restart_pause_us"].as_u64().is_some_and(|p| p > 0),
            "generation {g}: a claim without its pause: {s}"
        );
    }
}

/// A re-exec'd generation claims before its helper threads start (issue 21). One whose status
/// socket then cannot be bound (a mount point in its place: nobody can move it aside) lets the
/// jobs its lanes took finish, loses none, and exits 1 for the supervisor, saying why; before,
/// a start-up error ended it as any other (exit 6).
#[test]
fn a_restarted_generation_whose_helpers_cannot_start_finishes_its_jobs_and_exits_1() {
    let sb = Sandbox::new("helpers-fail");
    let mut w = sb.start();
    let sock = sb.path("state/worker/gearshift.sock");
    let long = sb.submit("sleep", "1500");
    w.wait_for(Duration::from_secs(10), "the sleep job to run", |s| {
        s["in_flight"] == 1
    });
    let spool = open_spool(&sb);
    let ids: Vec<String> = (0..20)
        .map(|i| spool.submit("echo", format!("q{i}").as_bytes()).unwrap())
        .collect();
    fs::remove_file(&sock).unwrap();
    fs::create_dir(&sock).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "gearshift-test", &sock.to_string_lossy()])
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        skip(
            "a_restarted_generation_whose_helpers_cannot_start_finishes_its_jobs_and_exits_1",
            "cannot mount a tmpfs (needs root)",
        );
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(sock.clone());
    w.signal(Signal::SIGHUP);
    let status = w.wait_exit(Duration::from_secs(30));
    let log = w.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("binding status socket"), "{log}");
    assert!(
        log.contains("stopping after the running jobs finish"),
        "{log}"
    );
    let long = all_outcomes(&sb, &[long], Duration::from_secs(5));
    assert_eq!(long[0], (true, "1500".to_string(), 1), "not interrupted");
    // Every queued job is either done (once) or still queued: none lost, none cut short.
    let queued = fs::read_dir(sb.path("spool/new")).unwrap().count();
    let done = ids
        .iter()
        .filter_map(|id| outcome(&spool, id))
        .inspect(|(ok, _, attempts)| assert!(*ok && *attempts == 1))
        .count();
    assert_eq!(done + queued, ids.len(), "{log}");
    assert_eq!(
        fs::read_dir(sb.path("spool/cur")).unwrap().count(),
        0,
        "{log}"
    );
}

/// The spool's consumer locks cross every exec held. A second worker on the same spool
/// (another `state_dir`: a careless second unit) whose start comes while the first one
/// restarts is refused, as at any other time. Before, the locks were close-on-exec: released
/// at each exec and taken again by the new generation; a second worker waiting for them (a
/// start waits 2 s for a spool whose worker may be exiting) took the spool in that moment, its
/// recovery would queue again the jobs the first one runs, and the first one's new generation
/// died "in use by another worker". (A stall of the new generation, in the fault build,
/// widens the moment.)
#[test]
fn a_second_worker_cannot_take_the_spool_while_the_first_restarts() {
    let mut sb = Sandbox::new("lock-exec");
    sb.bin = build_variant("faults", ("GEARSHIFT_FAULTS", "1"));
    let stall = sb.path("stall");
    let w = sb.start_env(&[("GEARSHIFT_FAULT_STALL_RESUMED", stall.to_str().unwrap())]);
    fs::write(&stall, "").unwrap();
    w.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(10), "the new generation held", || {
        w.log_text().contains("stalling at start-up")
    });
    a_second_worker_is_refused(&sb.path("spool"), w.pid());
    fs::remove_file(&stall).unwrap();
    let s = w.wait_generation(2);
    assert_eq!(s["pid"], w.pid());
    let id = sb.submit("echo", "after");
    eventually(
        Duration::from_secs(10),
        "the job done by the first worker",
        || sb.run(&["result", &id]).status.success(),
    );
}
