//! Jobs and the CLI: results, exit codes, bad input of every kind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;

use common::*;

/// After each job the reaper looks for what it left behind a few times (each look lists /proc):
/// jobs ending in a stream share those looks, so a worker is idle soon after a burst (it used
/// 25 ticks in the 2 s after these 300 jobs when every job had four looks of its own).
#[test]
fn a_worker_is_idle_soon_after_a_burst_of_jobs() {
    let sb = Sandbox::new("burst-idle");
    sb.job("noop.sh", "#!/bin/sh\ncat >/dev/null\n");
    let w = sb.start();
    let spool = open_spool(&sb);
    let ids: Vec<String> = (0..300)
        .map(|i| spool.submit("noop", format!("{i}").as_bytes()).unwrap())
        .collect();
    let outcomes = all_outcomes(&sb, &ids, Duration::from_secs(60));
    assert!(outcomes.iter().all(|(ok, _, _)| *ok), "{outcomes:?}");
    let used = idle_ticks(&w);
    assert!(
        used <= 4,
        "the worker used {used} ticks in the 2 s after the burst"
    );
}

#[test]
fn job_runs_and_result_is_readable() {
    let sb = Sandbox::new("basic");
    let _w = sb.start();
    let id = sb.submit("reverse", "hello");
    let out = sb.run(&["submit", "--wait", "sha256", "abc"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );

    all_outcomes(&sb, std::slice::from_ref(&id), Duration::from_secs(10));
    let out = sb.run(&["result", &id]);
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "olleh".to_string())
    );

    // Payload from stdin, binary-safe.
    let mut child = sb
        .cmd(&["submit", "--wait", "echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"a\0b\nc").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.stdout, b"a\0b\nc");
}

#[test]
fn result_exit_codes() {
    let sb = Sandbox::new("codes");
    // No worker yet: the job stays queued.
    let queued = sb.submit("echo", "x");
    let out = sb.run(&["result", &queued]);
    assert_eq!(out.status.code(), Some(5), "queued: {}", text(&out.stderr));
    let out = sb.run(&["result", "0123abcd-1-1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown id"));
    // What cannot be an id (a path, a typo with a space) is said as such, not as an id whose
    // result may have expired.
    for bad in ["../../etc/passwd", "f00 1", ""] {
        let out = sb.run(&["result", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(
            text(&out.stderr).contains("is no job id (an id is what submit prints"),
            "{bad:?}: {}",
            text_of(&out)
        );
    }
    // A long argument (a payload pasted in place of the id) is said cut, not echoed whole.
    let out = sb.run(&["result", &"payload ".repeat(12_000)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stderr.len() < 1024, "{} bytes", out.stderr.len());
    assert!(text(&out.stderr).contains("bytes cut"), "{}", text_of(&out));
    // No worker: said as such at the timeout, however short (it was exit 5, "not finished").
    let out = sb.run(&["submit", "--wait", "--timeout", "200ms", "echo", "y"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "--wait --timeout with no worker: {}",
        text_of(&out)
    );

    let _w = sb.start();
    let out = sb.run(&["submit", "--wait", "no_such_function", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("unknown function \"no_such_function\""),
        "{}",
        text(&out.stderr)
    );
    all_outcomes(&sb, std::slice::from_ref(&queued), Duration::from_secs(10));
    assert_eq!(sb.run(&["result", &queued]).status.code(), Some(0));
}

#[test]
fn shipped_example_jobs_work() {
    let sb = Sandbox::new("examples");
    let jobs = concat!(env!("CARGO_MANIFEST_DIR"), "/jobs");
    fs::write(
        sb.config(),
        sb.config_text("")
            .replace("jobs_dir = \"jobs\"", &format!("jobs_dir = \"{jobs}\"")),
    )
    .unwrap();
    let _w = sb.start();
    let out = sb.run(&["submit", "--wait", "wc", "one two  three\nfour"]);
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "4".to_string()),
        "{}",
        text(&out.stderr)
    );
    let out = sb.run(&["submit", "--wait", "title", "the quick brown fox"]);
    assert_eq!(
        text(&out.stdout),
        "The Quick Brown Fox",
        "{}",
        text(&out.stderr)
    );
    let out = sb.run(&["submit", "--wait", "title", ""]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("exit status 2: title: empty payload"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn crashing_hanging_and_noisy_executables_fail_cleanly() {
    let sb = Sandbox::new("bad-exe");
    sb.write_config("[functions.hang]\ntimeout = \"500ms\"\n");
    sb.job(
        "crash.sh",
        "#!/bin/sh\necho 'about to crash' >&2\nkill -SEGV $$\n",
    );
    sb.job("hang.sh", "#!/bin/sh\nsleep 60 &\nsleep 60\n");
    sb.job("fail.py", "#!/usr/bin/env python3\nimport sys\nsys.stderr.write('x' * 10000 + 'THE END')\nsys.exit(7)\n");
    fs::write(
        sb.path("jobs/notexec.sh"),
        "#!/bin/sh\necho not executable\n",
    )
    .unwrap();
    fs::write(sb.path("jobs/broken"), "#!/nonexistent/interpreter\n").unwrap();
    let mut p = fs::metadata(sb.path("jobs/broken")).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o755);
    fs::set_permissions(sb.path("jobs/broken"), p).unwrap();

    let w = sb.start();
    let spool = open_spool(&sb);
    let ids: Vec<String> = ["crash", "hang", "fail", "broken", "echo"]
        .iter()
        .map(|f| spool.submit(f, b"payload").unwrap())
        .collect();
    let o = all_outcomes(&sb, &ids, Duration::from_secs(30));
    assert!(
        !o[0].0 && o[0].1.starts_with("killed by SIGSEGV: about to crash"),
        "{:?}",
        o[0]
    );
    assert!(
        !o[1].0 && o[1].1.starts_with("timed out after 500ms"),
        "{:?}",
        o[1]
    );
    assert!(
        !o[2].0 && o[2].1.starts_with("exit status 7: ") && o[2].1.ends_with("THE END"),
        "{:?}",
        &o[2].1[..40]
    );
    assert!(o[2].1.len() < 3000, "stderr is cut to its tail");
    assert!(!o[3].0 && o[3].1.contains("cannot start"), "{:?}", o[3]);
    assert_eq!(o[4], (true, "payload".into(), 1));
    let s = w.status();
    assert_eq!(
        (s["jobs_failed"].as_u64(), s["jobs_completed"].as_u64()),
        (Some(4), Some(1))
    );
    // No stray process of the hanging job survives it.
    let leftovers = std::process::Command::new("pgrep")
        .args(["-f", &format!("{}", sb.path("jobs/hang.sh").display())])
        .output();
    if let Ok(out) = leftovers {
        assert!(
            out.stdout.is_empty(),
            "hang.sh still running: {}",
            text(&out.stdout)
        );
    }
    // notexec.sh is not executable, so it is no function.
    assert!(!s["functions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "notexec"));
}

/// A file the kernel will not run (ENOEXEC) is never run through a shell. std's `Command` ends in
/// `execvp`, and glibc's `execvp` hands such a file to `/bin/sh`: a program built for another
/// machine (an arm64 build deployed to amd64) failed with the shell's `Syntax error: "("
/// unexpected`, a binary cut short would have been read as a script, and a `#!` line naming
/// nothing ran the rest of the file as shell commands. Now the kernel's verdict is the outcome,
/// said with what the file is; `check` refuses the empty `#!` line at once.
#[test]
fn a_file_the_kernel_will_not_run_is_never_run_through_a_shell() {
    let sb = Sandbox::new("enoexec");
    // /bin/true, marked as built for AArch64 (e_machine 183), or for x86-64 on an AArch64 host.
    let mut elf = fs::read("/bin/true").unwrap();
    let other: u16 = if cfg!(target_arch = "aarch64") {
        62
    } else {
        183
    };
    elf[18..20].copy_from_slice(&other.to_le_bytes());
    let arm = sb.path("jobs/arm");
    fs::write(&arm, &elf).unwrap();
    // The same binary cut in the middle of its headers.
    let cut = sb.path("jobs/cut");
    fs::write(&cut, &fs::read("/bin/true").unwrap()[..40]).unwrap();
    for f in [&arm, &cut] {
        let mut p = fs::metadata(f).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o755);
        fs::set_permissions(f, p).unwrap();
    }
    let w = sb.start();
    let spool = open_spool(&sb);
    let ids: Vec<String> = ["arm", "cut"]
        .iter()
        .map(|f| spool.submit(f, b"payload").unwrap())
        .collect();
    let o = all_outcomes(&sb, &ids, Duration::from_secs(30));
    let machine = if cfg!(target_arch = "aarch64") {
        "x86-64"
    } else {
        "AArch64"
    };
    assert!(
        !o[0].0
            && o[0].1.contains("cannot start")
            && o[0].1.contains("Exec format error")
            && o[0].1.contains(&format!("an ELF program for {machine}")),
        "{:?}",
        o[0]
    );
    assert!(
        !o[1].0 && o[1].1.contains("cannot start") && o[1].1.contains("Exec format error"),
        "{:?}",
        o[1]
    );
    drop(w);
    sb.job("nothing", "#!\necho ran by a shell\n");
    let out = sb.run(&["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(
        text(&out.stderr).contains("its #! line names no interpreter"),
        "{}",
        text_of(&out)
    );
}

/// A job script whose `#!` interpreter is not there (a virtualenv path of another machine) or
/// that was saved with Windows line endings (its interpreter then reads `/bin/sh\r`) failed
/// with "cannot start jobs/NAME: No such file or directory" while the file was right there, and
/// `check` said nothing. Now the failure names the interpreter and why, and `check`, the log and
/// `status` warn about the line endings (read from the file, no lookup).
#[test]
fn a_job_whose_interpreter_cannot_run_says_which_and_why() {
    let sb = Sandbox::new("shebang");
    sb.write_config("");
    sb.job("py9", "#!/usr/bin/python9-gearshift-test -u\nprint(1)\n");
    sb.job("dos", "#!/bin/sh\r\necho hi\r\n");
    sb.job("bare", "#!python3\nprint(1)\n");
    // A program whose dynamic loader is not here (built against musl, run on glibc): a copy of
    // true(1) with its loader's path changed by one letter.
    let elf = fs::read("/bin/true").unwrap();
    let loader = b"/lib64/ld-linux-x86-64.so.2";
    if let Some(at) = elf.windows(loader.len()).position(|w| w == loader) {
        let mut patched = elf.clone();
        patched[at + loader.len() - 1] = b'9';
        sb.job_bytes("musl", &patched);
    }
    // A 32-bit program whose loader is not here (no 32-bit libraries): it was taken for a file
    // missing for a moment, waited for 10 s, then failed with "No such file or directory".
    sb.job_bytes("elf32", &elf32_needing("/lib/ld-linux-gearshift-test.so.2"));
    let check = sb.run(&["check"]);
    let said = text(&check.stdout) + &text(&check.stderr);
    assert!(
        said.contains("Windows line endings") && said.contains("dos"),
        "{said}"
    );
    let w = sb.start();
    let spool = open_spool(&sb);
    let ids: Vec<String> = ["py9", "dos", "bare", "musl", "elf32"]
        .iter()
        .map(|f| spool.submit(f, b"x").unwrap())
        .collect();
    let o = all_outcomes(&sb, &ids, Duration::from_secs(30));
    assert!(
        !o[0].0
            && o[0]
                .1
                .contains("interpreter \"/usr/bin/python9-gearshift-test\"")
            && o[0].1.contains("does not exist"),
        "{:?}",
        o[0]
    );
    assert!(
        !o[1].0 && o[1].1.contains("Windows line endings") && o[1].1.contains("/bin/sh\\r"),
        "{:?}",
        o[1]
    );
    assert!(
        !o[2].0 && o[2].1.contains("#!/usr/bin/env python3"),
        "{:?}",
        o[2]
    );
    if sb.path("jobs/musl").exists() {
        assert!(
            !o[3].0
                && o[3]
                    .1
                    .contains("dynamic loader \"/lib64/ld-linux-x86-64.so.9\""),
            "{:?}",
            o[3]
        );
    }
    // The kernel loads 32-bit x86 programs where it has IA-32 emulation (the loader is then
    // what is missing), and refuses them elsewhere (the machine is then named).
    assert!(
        !o[4].0
            && (o[4]
                .1
                .contains("dynamic loader \"/lib/ld-linux-gearshift-test.so.2\"")
                || o[4].1.contains("x86 (32-bit)")),
        "{:?}",
        o[4]
    );
    let s = w.status();
    assert!(has_warning(&s, "Windows line endings"), "{s}");
}

/// A 32-bit little-endian x86 ELF program of one header, one `PT_INTERP` naming `loader` and
/// nothing to run: enough for the kernel to look for its loader.
fn elf32_needing(loader: &str) -> Vec<u8> {
    let interp = [loader.as_bytes(), b"\0"].concat();
    let (header, entry) = (52u32, 32u32);
    let at = header + entry;
    let mut f = b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
    let le16 = |f: &mut Vec<u8>, v: u16| f.extend_from_slice(&v.to_le_bytes());
    let le32 = |f: &mut Vec<u8>, v: u32| f.extend_from_slice(&v.to_le_bytes());
    // e_type ET_EXEC, e_machine EM_386, e_version, e_entry, e_phoff, e_shoff, e_flags.
    le16(&mut f, 2);
    le16(&mut f, 3);
    for v in [1, 0x0804_8000 + at, header, 0, 0] {
        le32(&mut f, v);
    }
    // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx.
    for v in [header as u16, entry as u16, 1, 0, 0, 0] {
        le16(&mut f, v);
    }
    // PT_INTERP: p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align.
    let len = interp.len() as u32;
    for v in [3, at, 0, 0, len, len, 4, 1] {
        le32(&mut f, v);
    }
    f.extend_from_slice(&interp);
    f
}

/// Two more ways a deploy breaks a job script that `check` misread: a link in `jobs_dir` whose
/// target is gone (a versioned directory removed) was skipped without a word, so its function
/// vanished and its jobs failed as unknown; a script saved with a UTF-8 byte order mark before
/// its `#!` (some Windows editors) made `jobs_dir` invalid as having "no #! line", which the
/// file plainly has. Now the first is a warning naming the link's target, and the second says
/// what is in front of the `#!`. A FIFO and an executable with a name no function can have are
/// warnings too.
#[test]
fn a_link_to_nothing_and_a_byte_order_mark_in_jobs_dir_are_said() {
    let sb = Sandbox::new("jobs-dir-deploys");
    sb.write_config("");
    std::os::unix::fs::symlink("/opt/gearshift-test-gone/resize", sb.path("jobs/resize")).unwrap();
    let check = sb.run(&["check"]);
    let said = text(&check.stdout) + &text(&check.stderr);
    assert!(check.status.success(), "{said}");
    assert!(
        said.contains("resize")
            && said.contains("/opt/gearshift-test-gone/resize")
            && said.contains("does not exist"),
        "{said}"
    );
    // A FIFO (or a socket, a device) where a job was meant to be: no function, said.
    nix::unistd::mkfifo(
        &sb.path("jobs/convert"),
        nix::sys::stat::Mode::from_bits_truncate(0o755),
    )
    .unwrap();
    let check = sb.run(&["check"]);
    let said = text(&check.stdout) + &text(&check.stderr);
    assert!(
        check.status.success() && said.contains("convert") && said.contains("FIFO"),
        "{said}"
    );
    fs::remove_file(sb.path("jobs/convert")).unwrap();
    // An executable whose name no function can have (a copy a person made beside the real
    // one): no function, said, like a name that is not UTF-8. It made `jobs_dir` invalid, so
    // that a stray `resize copy.sh` kept the worker from starting at all.
    sb.job("resize copy.sh", "#!/bin/sh\necho hi\n");
    let check = sb.run(&["check"]);
    let said = text(&check.stdout) + &text(&check.stderr);
    assert!(check.status.success(), "{said}");
    assert!(
        said.contains("jobs/resize copy.sh\" is named for the function \"resize copy\", which no function can be called")
            && said.contains("so it is no job function (rename it)"),
        "{said}"
    );
    fs::remove_file(sb.path("jobs/resize copy.sh")).unwrap();
    sb.job("bom", "\u{feff}#!/bin/sh\necho hi\n");
    let check = sb.run(&["check"]);
    let said = text(&check.stdout) + &text(&check.stderr);
    assert!(!check.status.success(), "{said}");
    assert!(said.contains("byte order mark"), "{said}");
}

/// Ignored signals survive exec. A worker started by a launcher that ignores SIGCHLD (many a
/// PHP or Python service manager does, to be rid of zombies) had its job processes reaped by
/// the kernel: every executable job failed with "No child processes". And what else the
/// launcher ignored (`sh` ignores INT and QUIT for a background command, `nohup` HUP) reached
/// every job, and a SIGALRM ignored kept the re-exec'd generation's start-up alarm from ending a
/// hang. Now every image of the worker gives each ignored signal its default action back, but
/// SIGPIPE (which Rust ignores on purpose, and gives back to its children).
#[test]
fn signals_the_launcher_ignored_reach_neither_the_worker_nor_its_jobs() {
    let sb = Sandbox::new("ignored-signals");
    sb.job(
        "sigs.sh",
        "#!/bin/sh\ngrep -E '^SigIgn' /proc/self/status\n",
    );
    // A launcher that ignores them, then execs the worker.
    let launcher = "import os, signal, sys\n\
                    for s in ('SIGCHLD', 'SIGALRM', 'SIGINT', 'SIGQUIT', 'SIGHUP', 'SIGUSR2'):\n\
                    \x20   signal.signal(getattr(signal, s), signal.SIG_IGN)\n\
                    os.execv(sys.argv[1], sys.argv[1:])\n";
    let log = sb.path("worker.log");
    let mut w = Worker {
        child: std::process::Command::new("/usr/bin/python3")
            .args(["-c", launcher])
            .arg(&sb.bin)
            .arg("-c")
            .arg(sb.config())
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        socket: sb.path("state/worker/gearshift.sock"),
        log,
    };
    w.wait_for(Duration::from_secs(20), "serving", |s| {
        s["state"] == "running"
    });
    for round in ["fresh", "re-exec'd"] {
        let out = sb.run(&["submit", "--wait", "--timeout", "20s", "sigs", ""]);
        assert!(out.status.success(), "{round}: {}", text_of(&out));
        // The standard signals (1-31; what glibc reserves above them is not ours to change).
        let ignored = |line: &str| {
            let mask = line.trim().strip_prefix("SigIgn:").unwrap().trim();
            u64::from_str_radix(mask, 16).unwrap() & 0x7fff_ffff
        };
        assert_eq!(ignored(&text(&out.stdout)), 0, "{round}: the job");
        let status = fs::read_to_string(format!("/proc/{}/status", w.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("SigIgn:")).unwrap();
        assert_eq!(
            ignored(line),
            1 << 12,
            "{round}: the worker ignores SIGPIPE only"
        );
        if round == "fresh" {
            assert_eq!(sb.run(&["reload"]).status.code(), Some(0));
        }
    }
    w.signal(Signal::SIGTERM);
    assert_eq!(w.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn oversized_payload_fails_the_job_not_the_worker() {
    let sb = Sandbox::new("big");
    let cfg = sb
        .config_text("")
        .replace("concurrency = 2", "concurrency = 1\nmax_payload_bytes = 16");
    fs::write(sb.config(), cfg).unwrap();
    let _w = sb.start();
    // The CLI refuses at submit time...
    let out = sb.run(&["submit", "echo", "this payload is too long"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("over max_payload_bytes (16)"));
    // ...and a job that reaches the worker anyway (another submitter, a lowered limit) fails.
    let spool = open_spool(&sb);
    let big = spool.submit("echo", b"this payload is too long").unwrap();
    let ok = spool.submit("echo", b"short").unwrap();
    let o = all_outcomes(&sb, &[big, ok], Duration::from_secs(10));
    assert_eq!(
        o[0],
        (
            false,
            "payload is 24 bytes, over max_payload_bytes (16)".into(),
            1
        )
    );
    assert_eq!(o[1], (true, "short".into(), 1));
}

#[test]
fn malformed_config_gives_file_line_col_and_a_hint() {
    let sb = Sandbox::new("malformed");
    fs::write(sb.config(), "[worker]\nconcurrency = 2\nconcurency = 3\n").unwrap();
    for cmd in [&["run"][..], &["check"][..]] {
        let out = sb.run(cmd);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!(
                "{}:3:1: unknown key \"concurency\" (did you mean \"concurrency\"?)",
                sb.config().display()
            )),
            "{cmd:?}: {err}"
        );
    }
    fs::write(sb.config(), "[worker\nconcurrency = 2\n").unwrap();
    let err = text(&sb.run(&["check"]).stderr);
    assert!(err.contains("config.toml:1:8:"), "{err}");
    fs::write(sb.config(), "[functions.wc]\ntimeout = \"ten seconds\"\n").unwrap();
    let err = text(&sb.run(&["check"]).stderr);
    assert!(
        err.contains("config.toml:2:11: invalid duration \"ten seconds\""),
        "{err}"
    );

    // An empty file (what a truncating writer leaves for a moment) is refused.
    fs::write(sb.config(), "\n").unwrap();
    let err = text(&sb.run(&["check"]).stderr);
    assert!(err.contains("the file is empty (half-written?)"), "{err}");

    // A missing config file is named.
    fs::remove_file(sb.config()).unwrap();
    let err = text(&sb.run(&["run"]).stderr);
    assert!(
        err.contains("reading config") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn check_validates_config_and_jobs() {
    let sb = Sandbox::new("check");
    sb.job("wc.sh", "#!/bin/sh\nwc -w\n");
    let out = sb.run(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("wc: "), "{}", text(&out.stdout));

    sb.job("wc.py", "#!/usr/bin/env python3\n");
    let out = sb.run(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("function \"wc\" is defined twice"),
        "{}",
        text(&out.stderr)
    );
    fs::remove_file(sb.path("jobs/wc.py")).unwrap();

    sb.job("echo.sh", "#!/bin/sh\ncat\n");
    let out = sb.run(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("already a built-in"),
        "{}",
        text(&out.stderr)
    );
}

/// A worker with nothing to serve (a gearman source, whose built-ins are off unless asked for,
/// and an empty `jobs_dir`) passed `check` with an empty list, started with "1 lane(s) on
/// gearman: " and showed "functions: " in `status`: now a warning says why it serves nothing.
#[test]
fn a_worker_with_no_function_says_why() {
    let sb = Sandbox::new("no-functions");
    let config = sb.config_text("").replace(
        "kind = \"spool\"\ndir = \"spool\"\nfsync = false",
        "kind = \"gearman\"\nservers = [\"127.0.0.1:1\"]",
    );
    fs::write(sb.config(), config).unwrap();
    let out = sb.run(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let want = "no function to serve: jobs_dir";
    assert!(
        text(&out.stderr).contains(want) && text(&out.stderr).contains("builtins = true"),
        "{}",
        text_of(&out)
    );
    let w = sb.start();
    let s = w.status();
    assert!(has_warning(&s, want), "{s}");
    let out = sb.run(&["status"]);
    assert!(
        text(&out.stdout).contains("functions: none"),
        "{}",
        text_of(&out)
    );
}

/// A `jobs_dir` of hundreds of executables: `status` printed every name on one line (15 KB
/// for 2,000). Now it shows the first 40 and how many more, and `status --json` lists all.
#[test]
fn status_names_some_functions_and_counts_the_rest() {
    let sb = Sandbox::new("many-functions");
    sb.write_config("");
    for i in 0..100 {
        sb.job(&format!("f{i:03}"), "#!/bin/sh\ncat\n");
    }
    let w = sb.start();
    let all = w.status()["functions"].as_array().unwrap().len();
    assert!(all >= 100, "{all}");
    let out = sb.run(&["status"]);
    let said = text(&out.stdout);
    let line = said
        .lines()
        .find(|l| l.trim_start().starts_with("functions:"))
        .unwrap_or_default();
    assert!(
        line.contains(&format!("and {} more", all - 40)) && line.contains("status --json"),
        "{said}"
    );
}

/// A `jobs_dir` of thousands of executables (`jobs_dir` pointed at a directory of programs,
/// or filled by a runaway deploy) was served whole: 9,000 functions of long names made a status
/// document over the 1 MiB a client reads, so `status` and `reload` could no longer ask the
/// worker, and 37 MB of metrics. Now more than 4,096 executables is a refusal, like any
/// invalid `jobs_dir`: `check` says so, and a running worker keeps serving what it has.
#[test]
fn a_jobs_dir_of_more_executables_than_a_worker_serves_is_refused() {
    let sb = Sandbox::new("too-many-functions");
    sb.write_config("");
    let w = sb.start();
    for i in 0..4097 {
        sb.job(&format!("f{i:04}"), "#!/bin/sh\ncat\n");
    }
    let out = sb.run(&["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(
        text(&out.stderr).contains("more than 4096 executables"),
        "{}",
        text_of(&out)
    );
    let s = w.wait_for(Duration::from_secs(20), "the change refused", |s| {
        s["last_refused_reload"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("more than 4096 executables"))
    });
    // While the files were written, a generation may have taken a jobs_dir of fewer (the
    // watch saw a change part way); none serves all of them (f4096, written last).
    let functions = s["functions"].as_array().unwrap();
    assert!(!functions.iter().any(|f| f == "f4096"), "{s}");
    assert_eq!(sb.run(&["status"]).status.code(), Some(0));
    let out = sb.run(&["submit", "--wait", "reverse", "abc"]);
    assert_eq!(text(&out.stdout), "cba", "{}", text_of(&out));
}

/// A `[functions.NAME]` for no function is a warning; one per table made a config of 20,000
/// such tables (a generated file, 370 KB) 20,000 warnings, each logged at every start and
/// restart, and 99 of them in `status`. Now they are one warning that names some.
#[test]
fn warnings_for_many_unknown_functions_are_one() {
    let sb = Sandbox::new("many-unknown");
    let tables: String = (0..20_000)
        .map(|i| format!("[functions.nothing{i}]\ntimeout = \"1s\"\n"))
        .collect();
    sb.write_config(&tables);
    let w = sb.start();
    let out = sb.run(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let warnings = s["warnings"].as_array().unwrap();
    assert!(warnings.len() < 5, "{}", warnings.len());
    assert!(
        has_warning(&s, "[functions.nothing0]") && has_warning(&s, "and 19990 more"),
        "{s}"
    );
    assert!(w.log_text().lines().count() < 20, "{}", w.log_text().len());
}

#[test]
fn second_worker_on_the_same_state_is_refused() {
    let sb = Sandbox::new("twice");
    let w = sb.start();
    let out = sb.run(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&format!("already running (pid {})", w.pid())),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_users_own_binary_adds_rust_functions() {
    let mut sb = Sandbox::new("custom");
    sb.bin = example("custom_worker");
    let w = sb.start();
    let fns = w.status()["functions"].clone();
    for f in ["shout", "count_lines", "must_be_even", "slow", "echo"] {
        assert!(
            fns.as_array().unwrap().iter().any(|x| x == f),
            "{f} missing from {fns}"
        );
    }
    let out = sb.run(&["submit", "--wait", "shout", "hey"]);
    assert_eq!(text(&out.stdout), "HEY");
    let out = sb.run(&["submit", "--wait", "must_be_even", "7"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("7 is odd"),
        "{}",
        text(&out.stderr)
    );
    let out = sb.run(&["submit", "--wait", "must_be_even", "seven"]);
    assert!(
        text(&out.stderr).contains("invalid digit"),
        "{}",
        text(&out.stderr)
    );
    // It restarts in place like the stock binary.
    let out = sb.run(&["reload"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(w.status()["binary"], sb.bin.display().to_string());
}

/// A job whose executable is missing at that moment (a deploy that removes the file, or moves
/// `jobs_dir` aside, before it puts the new one in place) failed at once, its result lost to
/// the deploy's window: it is started again shortly, as a busy one is, and runs once the file
/// is back. A missing `#!` interpreter (the file is there) still fails at once.
#[test]
fn an_executable_missing_for_a_moment_is_waited_for_not_failed() {
    let sb = Sandbox::new("enoent");
    sb.job("up.sh", "#!/bin/sh\ntr a-z A-Z\n");
    sb.job("gone.sh", "#!/no/such/interpreter\n");
    // Not watched: the function stays while its file is away (watched, a restart would come
    // too, which releases the waiting job to the next generation).
    sb.write_worker_config("watch_jobs = false");
    let w = sb.start();
    fs::rename(sb.path("jobs"), sb.path("jobs.deploying")).unwrap();
    let id = sb.submit("up", "moment");
    let spool = open_spool(&sb);
    eventually(
        Duration::from_secs(10),
        "the missing executable seen",
        || w.log_text().contains("trying again shortly"),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        outcome(&spool, &id).is_none(),
        "failed while the file was away: {}",
        w.log_text()
    );
    fs::rename(sb.path("jobs.deploying"), sb.path("jobs")).unwrap();
    let out = all_outcomes(&sb, std::slice::from_ref(&id), Duration::from_secs(10));
    assert_eq!(out[0], (true, "MOMENT".to_string(), 1));
    // The file there, its interpreter not: failed at once (not after the 10 s a missing file
    // is waited for), saying which.
    let id = sb.submit("gone", "x");
    let out = all_outcomes(&sb, std::slice::from_ref(&id), Duration::from_secs(5));
    assert!(
        !out[0].0 && out[0].1.contains("/no/such/interpreter"),
        "{out:?}"
    );
}

/// A job whose executable is open for writing at that moment (a deploy writing it in place:
/// exec says ETXTBSY) waits for the writer instead of failing, and runs once it is closed.
#[test]
fn an_executable_being_written_is_waited_for_not_failed() {
    let sb = Sandbox::new("etxtbsy");
    let exe = sb.job("up.sh", "#!/bin/sh\ntr a-z A-Z\n");
    let w = sb.start();
    w.status();
    // The writer: open for writing, content unchanged (the watch sees no new digest).
    let writer = fs::OpenOptions::new().write(true).open(&exe).unwrap();
    let id = sb.submit("up", "busy");
    let spool = open_spool(&sb);
    // The job has been tried (the log says so) and is still not failed.
    eventually(Duration::from_secs(10), "the busy executable seen", || {
        w.log_text().contains("Text file busy")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        outcome(&spool, &id).is_none(),
        "failed while the file was busy"
    );
    drop(writer);
    let out = all_outcomes(&sb, std::slice::from_ref(&id), Duration::from_secs(10));
    assert_eq!(out[0], (true, "BUSY".to_string(), 1));
}

/// A deploy adds a job executable and something submits a job for it at once: the worker has
/// not restarted onto it yet (the change is debounced, judged, maybe splayed). Before, the
/// job failed at once, for good ("unknown function"); now it waits for the restart that
/// serves it (and cuts a splay short), while a name no file offers still fails at once.
#[test]
fn a_job_for_a_function_just_added_to_jobs_dir_waits_for_the_restart_that_serves_it() {
    let sb = Sandbox::new("just-added");
    sb.job("up.sh", "#!/bin/sh\ntr a-z A-Z\n");
    sb.write_worker_config("restart_splay = \"1h\"");
    let w = sb.start();
    sb.job("down.sh", "#!/bin/sh\ntr A-Z a-z\n");
    let id = sb.submit("down", "NEW");
    let typo = sb.submit("dwon", "x");
    let out = all_outcomes(&sb, &[id, typo], Duration::from_secs(20));
    assert_eq!(out[0], (true, "new".to_string(), 1), "{}", w.log_text());
    assert!(
        !out[1].0 && out[1].1.contains("unknown function \"dwon\""),
        "{out:?}"
    );
    let s = w.status();
    assert_eq!(s["generation"], 2, "{s}");
    assert_eq!(s["last_restart_reason"], "jobs changed", "{s}");
    assert!(
        w.log_text().contains("waits for function \"down\""),
        "{}",
        w.log_text()
    );
}
