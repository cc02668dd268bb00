//! TLS to gearmand: `tls://` servers verified against `[source.tls] ca_file`, through stunnel in
//! front of a real gearmand (Debian's gearmand accepts `--ssl` but does not speak TLS).
//! Certificates are made by `openssl` per test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is needed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        text(&out.stderr)
    );
}

/// A CA (`NAME-ca.crt`) and a certificate it signed for 127.0.0.1 (`NAME.crt`, `NAME.key`),
/// valid for `days` (negative: already expired).
fn certs(dir: &Path, name: &str, days: i32) -> (PathBuf, PathBuf, PathBuf) {
    let ca = format!("{name}-ca");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.crt"),
            "-days",
            "30",
            "-subj",
            &format!("/CN={ca}"),
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    fs::write(
        dir.join(format!("{name}.ext")),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            &days.to_string(),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
    (
        dir.join(format!("{ca}.crt")),
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    )
}

/// stunnel terminating TLS on a free port in front of `backend`; `verify_ca`: require a client
/// certificate signed by it.
struct Stunnel {
    child: Child,
    port: u16,
}

impl Stunnel {
    fn start(
        sb: &Sandbox,
        name: &str,
        backend: &str,
        cert: &Path,
        key: &Path,
        verify_ca: Option<&Path>,
    ) -> Option<Stunnel> {
        let bin = ["stunnel4", "stunnel"].into_iter().find(|b| {
            Command::new(b)
                .arg("-version")
                .stderr(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .is_ok()
        })?;
        let port = free_port();
        let verify = verify_ca.map_or(String::new(), |ca| {
            format!("verifyChain = yes\nCAfile = {}\n", ca.display())
        });
        let conf = sb.path(&format!("stunnel-{name}.conf"));
        fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\noutput = {}\n[gearman]\naccept = 127.0.0.1:{port}\nconnect = {backend}\ncert = {}\nkey = {}\n{verify}",
                sb.path(&format!("stunnel-{name}.log")).display(),
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        let child = spawn(
            Command::new(bin)
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        eventually(Duration::from_secs(10), "stunnel to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(Stunnel { child, port })
    }

    fn addr(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server<'a>(s: &'a Value, addr: &str) -> &'a Value {
    s["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["address"] == addr)
        .unwrap_or_else(|| panic!("no {addr} in {}", s["servers"]))
}

#[test]
fn jobs_flow_over_tls_and_bad_servers_are_clear_errors_beside_a_good_one() {
    let sb = Sandbox::new("tls");
    let dir = sb.path("");
    let (ca, cert, key) = certs(&dir, "good", 30);
    let (_other_ca, other_cert, other_key) = certs(&dir, "other", 30);
    let (_, expired_cert, expired_key) = certs(&dir, "expired", -1);
    let gm = Gearmand::start(&sb.dir, &[]);
    let Some(good) = Stunnel::start(&sb, "good", &gm.addr(), &cert, &key, None) else {
        skip(
            "tls::jobs_flow_over_tls_and_bad_servers_are_clear_errors_beside_a_good_one",
            "no stunnel (Debian's stunnel4)",
        );
        return;
    };
    let wrong_ca =
        Stunnel::start(&sb, "wrong-ca", &gm.addr(), &other_cert, &other_key, None).unwrap();
    let expired = Stunnel::start(
        &sb,
        "expired",
        &gm.addr(),
        &expired_cert,
        &expired_key,
        None,
    )
    .unwrap();
    let plain = format!("tls://{}", gm.addr());
    let servers = [good.addr(), wrong_ca.addr(), expired.addr(), plain.clone()];
    sb.gearman_config(
        &servers,
        &format!(
            "io_timeout = \"2s\"\nreconnect_max = \"1s\"\n\n[source.tls]\nca_file = \"{}\"\n",
            ca.display()
        ),
    );
    let w = sb.start();
    let s = w.wait_for(
        Duration::from_secs(20),
        "the good server connected, the bad ones failed",
        |s| {
            server(s, &good.addr())["state"] == "connected"
                && [&wrong_ca.addr(), &expired.addr(), &plain]
                    .iter()
                    .all(|a| server(s, a)["last_error"].is_string())
        },
    );
    let err = |a: &str| server(&s, a)["last_error"].as_str().unwrap().to_string();
    assert!(
        err(&wrong_ca.addr()).contains("UnknownIssuer"),
        "{}",
        err(&wrong_ca.addr())
    );
    assert!(
        err(&expired.addr()).contains("Expired"),
        "{}",
        err(&expired.addr())
    );
    assert!(
        err(&plain).contains("TLS") || err(&plain).contains("closed"),
        "{}",
        err(&plain)
    );
    for a in [&wrong_ca.addr(), &expired.addr(), &plain] {
        assert_ne!(server(&s, a)["state"], "connected", "{a}");
    }
    // Jobs flow through the good server, submitted over TLS too (the client goes to the
    // first server that answers: the good one is listed first).
    for i in 0..20 {
        let out = sb.run(&["submit", "--timeout", "10s", "reverse", &format!("tls{i}")]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let want: String = format!("tls{i}").chars().rev().collect();
        assert_eq!(text(&out.stdout).trim(), want);
    }
    // A payload and result of 3 MiB: hundreds of TLS records each way, through rustls'
    // buffers and the lane's read loop.
    let big: String = (0..3 << 20)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let out = output_with_stdin(
        &mut sb.cmd(&["submit", "--timeout", "30s", "reverse"]),
        big.as_bytes(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let want: String = big.chars().rev().collect();
    assert!(
        out.stdout.as_slice() == want.as_bytes(),
        "3 MiB result differs ({} bytes)",
        out.stdout.len()
    );
    let log = w.log_text();
    assert!(
        log.contains("UnknownIssuer") && log.contains("Expired"),
        "{log}"
    );
}

#[test]
fn a_server_that_asks_for_a_client_certificate_gets_one() {
    let sb = Sandbox::new("tls-client-cert");
    let dir = sb.path("");
    let (ca, cert, key) = certs(&dir, "server", 30);
    let (client_ca, client_cert, client_key) = certs(&dir, "client", 30);
    let gm = Gearmand::start(&sb.dir, &[]);
    let Some(tunnel) = Stunnel::start(&sb, "mtls", &gm.addr(), &cert, &key, Some(&client_ca))
    else {
        skip(
            "tls::a_server_that_asks_for_a_client_certificate_gets_one",
            "no stunnel (Debian's stunnel4)",
        );
        return;
    };
    let tls = |with_cert: bool| {
        let mut t = format!("\n[source.tls]\nca_file = \"{}\"\n", ca.display());
        if with_cert {
            t.push_str(&format!(
                "cert_file = \"{}\"\nkey_file = \"{}\"\n",
                client_cert.display(),
                client_key.display()
            ));
        }
        t
    };
    sb.gearman_config(std::slice::from_ref(&tunnel.addr()), &tls(false));
    let out = sb.run(&["submit", "--timeout", "5s", "reverse", "abc"]);
    assert!(!out.status.success(), "served without a client certificate");
    sb.gearman_config(std::slice::from_ref(&tunnel.addr()), &tls(true));
    let _w = sb.start();
    let out = sb.run(&["submit", "--timeout", "10s", "reverse", "abc"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "cba");
}

#[test]
fn tls_settings_are_checked_with_file_line_col_and_file_names() {
    let sb = Sandbox::new("tls-config");
    sb.gearman_config(&["tls://127.0.0.1:4731".to_string()], "");
    let err = text(&sb.run(&["check"]).stderr);
    assert!(
        err.contains("config.toml:") && err.contains("[source.tls]"),
        "{err}"
    );
    sb.gearman_config(
        &["tls://127.0.0.1:4731".to_string()],
        "\n[source.tls]\nca_file = \"nope.pem\"\n",
    );
    let err = text(&sb.run(&["check"]).stderr);
    assert!(err.contains("nope.pem"), "{err}");
    fs::write(sb.path("junk.pem"), "not a certificate\n").unwrap();
    sb.gearman_config(
        &["tls://127.0.0.1:4731".to_string()],
        "\n[source.tls]\nca_file = \"junk.pem\"\ncert_file = \"junk.pem\"\n",
    );
    let err = text(&sb.run(&["check"]).stderr);
    assert!(err.contains("cert_file and key_file go together"), "{err}");
    sb.gearman_config(
        &["tls://127.0.0.1:4731".to_string()],
        "\n[source.tls]\nca_file = \"junk.pem\"\n",
    );
    let err = text(&sb.run(&["check"]).stderr);
    assert!(
        err.contains("junk.pem") && err.contains("no certificate"),
        "{err}"
    );
}

/// Root reads the certificate files at `check` and `start`: a FIFO or a link planted in their
/// place is refused, never opened blocking or followed.
#[test]
fn planted_certificate_files_are_refused_not_read() {
    let sb = Sandbox::new("tls-planted");
    let fifo = sb.path("ca.pem");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    sb.gearman_config(
        &["tls://127.0.0.1:4731".to_string()],
        "\n[source.tls]\nca_file = \"ca.pem\"\n",
    );
    let mut child = spawn(
        sb.cmd(&["check"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let status = wait_child(&mut child, Duration::from_secs(10));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("check hung opening a FIFO planted as ca_file");
    }
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("ca.pem") && err.contains("not a regular file"),
        "{err}"
    );
    fs::remove_file(&fifo).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", &fifo).unwrap();
    let out = sb.run(&["check"]);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("ca.pem"), "{err}");
}

/// Under a privilege drop, `check` reads the TLS files as the worker's user will: a key only root
/// can read is a clear error naming the file and the user (not a bare "Permission denied" after
/// `start`), and a key that user can read (so every job can) is warned about.
#[test]
fn tls_files_are_checked_for_the_workers_user() {
    let mut sb = Sandbox::new("tls-user");
    sb.own_binary();
    let (ca, cert, key) = certs(&sb.dir, "client", 30);
    sb.gearman_config(
        &["tls://127.0.0.1:4731".to_string()],
        &format!(
            "\n[source.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            ca.display(),
            cert.display(),
            key.display()
        ),
    );
    let cfg = fs::read_to_string(sb.config())
        .unwrap()
        .replace("allow_root = true", "user = \"nobody\"");
    fs::write(sb.config(), cfg).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let out = sb.run(&["check"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        err.contains("key_file")
            && err.contains(&key.display().to_string())
            && err.contains("nobody"),
        "{err}"
    );

    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    nix::unistd::chown(&key, None, Some(nobody.gid)).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
    let out = sb.run(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        said.contains("key_file") && said.contains("by every job"),
        "{said}"
    );
}

/// A v1 client certificate (no extensions) is named with its file and what to do, not as
/// `Other(OtherError(UnsupportedCertVersion))`.
#[test]
fn a_v1_client_certificate_is_explained() {
    let sb = Sandbox::new("tls-v1");
    let dir = sb.path("");
    let (ca, _, _) = certs(&dir, "server", 30);
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "v1.key",
            "-out",
            "v1.csr",
            "-subj",
            "/CN=client",
        ],
    );
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "v1.csr",
            "-CA",
            "server-ca.crt",
            "-CAkey",
            "server-ca.key",
            "-CAcreateserial",
            "-out",
            "v1.crt",
            "-days",
            "30",
        ],
    );
    sb.gearman_config(
        &["tls://127.0.0.1:4731".to_string()],
        &format!(
            "\n[source.tls]\nca_file = \"{}\"\ncert_file = \"v1.crt\"\nkey_file = \"v1.key\"\n",
            ca.display()
        ),
    );
    let out = sb.run(&["check"]);
    let err = text(&out.stderr);
    let made = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(dir.join("v1.crt"))
        .output()
        .unwrap();
    assert!(
        text(&made.stdout).contains("Version: 1 (0x0)"),
        "openssl made no v1 certificate here: {}",
        text(&made.stdout)
    );
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("v1.crt") && err.contains("X.509 v1 certificate"),
        "{err}"
    );
}
