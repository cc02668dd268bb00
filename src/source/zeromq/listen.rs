//! The ZeroMQ source's listening sockets, bound once so they outlive every exec: the ingress's
//! engine serves a duplicate of each (and closes it when it stops); the original is handed to
//! the next generation, so a client connecting during a restart waits in the kernel's accept
//! queue instead of being refused.

use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;

use nix::errno::Errno;

use crate::config::Endpoint;
use crate::error::{Error, Result};
use crate::text::ShowPath;

/// One endpoint's listening socket.
pub struct Listener {
    pub endpoint: Endpoint,
    pub fd: OwnedFd,
    /// An `ipc://` endpoint's socket file as bound or adopted (device, inode): one no longer
    /// at its path (removed by a clean-up, replaced) is bound again ([`renew`]).
    pub file: Option<(u64, u64)>,
}

/// The identity of the file at an `ipc://` endpoint's path, if one is there.
fn file_at(ep: &Endpoint) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    match ep {
        Endpoint::Ipc(path) => std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino())),
        Endpoint::Tcp { .. } => None,
    }
}

/// An `ipc://` endpoint whose socket file is no longer the one bound (removed by a clean-up of
/// `/tmp` or `/run`, or replaced): no client could connect again, however long the worker ran.
/// Binds a new socket at the path (as at a start: a file there is replaced only if nobody
/// listens on it), keeps it as this listener's (the one handed across the next exec) and
/// returns a duplicate for the ingress to serve. None: the endpoint is as bound, or is TCP.
pub fn renew(l: &mut Listener) -> Option<Result<OwnedFd>> {
    // No file at the path is always a file gone (also one removed before this generation
    // adopted the socket, which then recorded none).
    let there = file_at(&l.endpoint);
    if !matches!(l.endpoint, Endpoint::Ipc(_)) || there.is_some_and(|f| Some(f) == l.file) {
        return None;
    }
    let renewed = bind_new(&l.endpoint).and_then(|fd| {
        let dup = fd
            .try_clone()
            .map_err(|e| Error::io("duplicating a listening socket", e))?;
        l.fd = fd;
        l.file = file_at(&l.endpoint);
        Ok(dup)
    });
    Some(renewed)
}

/// The listening sockets for `bind`: those the previous generation handed over (`carried`, by
/// endpoint), else new ones. A carried socket whose endpoint is no longer configured is closed.
pub fn open(bind: &[Endpoint], carried: Vec<(String, OwnedFd)>) -> Result<Vec<Listener>> {
    let mut adopted = carried;
    let mut out = Vec::with_capacity(bind.len());
    for ep in bind {
        let name = ep.to_string();
        let fd = match adopted.iter().position(|(e, _)| *e == name) {
            Some(i) => adopted.swap_remove(i).1,
            None => bind_new(ep)?,
        };
        out.push(Listener {
            endpoint: ep.clone(),
            fd,
            file: file_at(ep),
        });
    }
    // What is left of `adopted` is dropped here: endpoints no longer configured are closed.
    Ok(out)
}

/// How long the host of a `bind` endpoint may take to be looked up.
const BIND_LOOKUP: std::time::Duration = std::time::Duration::from_secs(3);

fn bind_new(ep: &Endpoint) -> Result<OwnedFd> {
    match ep {
        Endpoint::Tcp { host, port } => {
            let host = if host == "*" {
                "0.0.0.0"
            } else {
                host.as_str()
            };
            // Bounded: a name server that does not answer held a start (and a reload's new
            // generation, serving nothing) for the resolver's whole timeout.
            let target = crate::source::resolve::target(host, *port);
            let by = std::time::Instant::now() + BIND_LOOKUP;
            let addr = crate::source::resolve::addresses_by(&target, by)
                .map_err(|e| Error::io(format!("resolving {ep}"), e))?
                .into_iter()
                .next()
                .ok_or_else(|| Error::Msg(format!("{ep}: the host has no address")))?;
            let l = std::net::TcpListener::bind(addr)
                .map_err(|e| Error::io(format!("binding {ep}"), e))?;
            Ok(OwnedFd::from(l))
        }
        Endpoint::Ipc(path) => {
            // A socket file left by a worker that is gone is replaced; one a live process
            // listens on, or anything that is not a socket, is not touched.
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if !meta.file_type().is_socket() {
                    return Err(Error::Unsafe(format!(
                        "{ep}: \"{}\" exists and is not a socket; remove it or choose another path",
                        path.shown()
                    )));
                }
                // A connect that cannot block (see `connect_unix`); a full backlog is a
                // listener too.
                match super::sockets::connect_unix(path) {
                    Ok(_) | Err(Errno::EAGAIN) => {
                        return Err(Error::Msg(format!(
                            "{ep}: another process listens on \"{}\"",
                            path.shown()
                        )))
                    }
                    Err(Errno::ECONNREFUSED | Errno::ENOENT) => {}
                    Err(e) => {
                        return Err(Error::io(
                            format!("{ep}: telling whether a process listens on it"),
                            e.into(),
                        ))
                    }
                }
                let _ = std::fs::remove_file(path);
            }
            let l = std::os::unix::net::UnixListener::bind(path)
                .map_err(|e| Error::io(format!("binding {ep}"), e))?;
            Ok(OwnedFd::from(l))
        }
    }
}
