//! Running a program as the kernel loads it, or failing with the kernel's own error.
//!
//! std's `Command` ends in `execvp`, and glibc's `execvp` hands a file the kernel refuses with
//! ENOEXEC to `/bin/sh`: a program built for another machine (an arm64 build deployed to
//! amd64) then fails with the shell's `Syntax error: "(" unexpected`, a binary cut short is read
//! as a script, and a `#!` line naming nothing runs the rest of its file as shell commands.
//! Jobs, pre-flights and the supervised worker run without a shell, so [`exactly`] makes the
//! child `execve` the program itself, last thing before std would, and a refusal comes back as
//! the spawn's error (ENOEXEC: "Exec format error"). Written here rather than with a crate: it
//! is one `execve` on arrays built before the fork, and std's own spawn does the rest.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Where a command's environment starts from: nothing (`env_clear` was called), or this
/// process's own. std's `Command` does not tell, so the caller says.
pub enum Env {
    Cleared,
    Inherited,
}

/// A NULL-terminated array of pointers into the strings it owns, built before the fork: the
/// child may not allocate (another thread may hold the allocator's lock at the fork).
struct Array {
    _owned: Vec<CString>,
    ptrs: Vec<*const libc::c_char>,
}

// SAFETY: the pointers point into the heap buffers of `_owned`, which the Array owns and never
// changes or frees while it lives; they are only read, by `execve` in the forked child.
unsafe impl Send for Array {}
// SAFETY: as for Send: nothing is ever written through or to these pointers.
unsafe impl Sync for Array {}

impl Array {
    fn new(owned: Vec<CString>) -> Array {
        let mut ptrs: Vec<*const libc::c_char> = owned.iter().map(|c| c.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        Array {
            _owned: owned,
            ptrs,
        }
    }

    /// The array for `execve` (a method, so that a closure captures the whole Array).
    fn as_ptr(&self) -> *const *const libc::c_char {
        self.ptrs.as_ptr()
    }
}

fn c_string(bytes: Vec<u8>) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a NUL byte in an argument or in the environment",
        )
    })
}

/// `KEY=VALUE` strings for `execve`, in the order given (this one and the worker's re-exec).
pub fn environment(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
) -> io::Result<Vec<CString>> {
    vars.into_iter()
        .map(|(k, v)| {
            let mut pair = k.into_vec();
            pair.push(b'=');
            pair.extend_from_slice(OsStr::as_bytes(&v));
            c_string(pair)
        })
        .collect()
}

/// Makes `cmd` exec its program exactly (see the module): call it after every other `pre_exec`
/// of `cmd`, right before the spawn, once its arguments and environment are set. A program
/// without a `/` (looked up in PATH) is left to std.
pub fn exactly(cmd: &mut Command, env: Env) -> io::Result<()> {
    let program = cmd.get_program();
    if !program.as_bytes().contains(&b'/') {
        return Ok(());
    }
    let path = c_string(program.as_bytes().to_vec())?;
    let mut argv = vec![path.clone()];
    for arg in cmd.get_args() {
        argv.push(c_string(arg.as_bytes().to_vec())?);
    }
    let mut vars: BTreeMap<OsString, OsString> = match env {
        Env::Cleared => BTreeMap::new(),
        Env::Inherited => std::env::vars_os().collect(),
    };
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => vars.insert(key.to_owned(), v.to_owned()),
            None => vars.remove(key),
        };
    }
    let (argv, envp) = (Array::new(argv), Array::new(environment(vars)?));
    // SAFETY: the closure runs in the forked child, after std has set up its descriptors and
    // directory and after the caller's own closures, and calls only `execve` (async-signal-safe)
    // on arrays built before the fork; it allocates nothing. Should the exec fail, std reports
    // the error to the parent as it does for its own exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            Err(io::Error::last_os_error())
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The program gets exactly its arguments and environment, and a file the kernel refuses
    /// is an error, not a shell's run of it.
    #[test]
    fn runs_the_program_itself_or_fails_as_the_kernel_says() {
        let dir = crate::testutil::tempdir("exact", "enoexec");
        let mut cmd = Command::new("/bin/sh");
        cmd.args([
            "-c",
            "printf '%s|%s|%s' \"$0\" \"$1\" \"$ONLY\"",
            "zero",
            "one",
        ])
        .env_clear()
        .env("ONLY", "this")
        .env("GONE", "x")
        .env_remove("GONE");
        exactly(&mut cmd, Env::Cleared).unwrap();
        let out = cmd.output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "zero|one|this");

        let script = dir.join("no-shebang");
        std::fs::write(&script, "echo ran by a shell\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        // With a `pre_exec` (every spawn of ours has one) std forks and calls `execvp`, whose
        // fallback runs the file through a shell.
        let mut plain = Command::new(&script);
        // SAFETY: the closure does nothing.
        unsafe {
            plain.pre_exec(|| Ok(()));
        }
        let plain = plain.output().unwrap();
        assert_eq!(
            plain.stdout, b"ran by a shell\n",
            "glibc's fallback, without us"
        );
        let mut cmd = Command::new(&script);
        exactly(&mut cmd, Env::Inherited).unwrap();
        let err = cmd.output().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOEXEC), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
