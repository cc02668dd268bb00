//! What a job script's `#!` line says, for the mistakes that make it fail with a bare "No such
//! file or directory" while the script is right there: an interpreter that is not on this
//! machine (a virtualenv path of another), Windows line endings (the kernel then looks for an
//! interpreter whose name ends in a carriage return); and the same for a program whose dynamic
//! loader is not here (built against musl, run on glibc). Read from the file itself; the
//! interpreter's path is looked at only after an exec has already failed on it.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::text::ShowPath;

/// How much of a file the kernel reads for its `#!` line (`BINPRM_BUF_SIZE`).
pub const HEAD: usize = 256;

/// The first line after `#!`, if `head` (the start of a file) has one.
fn line(head: &[u8]) -> Option<&[u8]> {
    let rest = head.strip_prefix(b"#!")?;
    Some(&rest[..rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len())])
}

/// The interpreter a `#!` line names: its first word, as the kernel splits it (at spaces and
/// tabs only: a carriage return is part of the name).
pub fn interpreter(head: &[u8]) -> Option<&[u8]> {
    let l = line(head)?;
    let start = l.iter().position(|&b| b != b' ' && b != b'\t')?;
    let l = &l[start..];
    Some(
        &l[..l
            .iter()
            .position(|&b| b == b' ' || b == b'\t')
            .unwrap_or(l.len())],
    )
}

/// Why an executable starting with `head` cannot run without a shell (it makes `jobs_dir`
/// invalid): no `#!` line and no ELF header, or a byte order mark in front of the `#!`.
pub fn cannot_run(path: &Path, head: &[u8]) -> Option<String> {
    if head.starts_with(b"\xef\xbb\xbf#!") {
        return Some(format!(
            "\"{}\" starts with a UTF-8 byte order mark in front of its #! line (saved so by a Windows editor), so the kernel sees no #! line; remove the mark (e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' \"{}\")",
            path.shown(),
            path.shown()
        ));
    }
    if head.starts_with(b"#!") && interpreter(head).is_none() {
        return Some(format!(
            "\"{}\": its #! line names no interpreter (write one, such as #!/bin/sh)",
            path.shown()
        ));
    }
    (!(head.starts_with(b"#!") || head.starts_with(b"\x7fELF"))).then(|| {
        format!(
            "\"{}\" has no #! line and is no ELF binary: it could only run through a shell, and jobs run without one (add a line such as #!/bin/sh)",
            path.shown()
        )
    })
}

/// Said of a script whose `#!` line ends in a carriage return (`check`, the log and `status`).
pub fn line_endings_warning(path: &Path, head: &[u8]) -> Option<String> {
    line(head)?.contains(&b'\r').then(|| {
        format!(
            "\"{}\" has Windows line endings: its #! line names \"{}\", and every job of it fails (convert it: dos2unix)",
            path.shown(),
            crate::text::escape_bytes(line(head).unwrap_or_default().trim_ascii_start())
        )
    })
}

/// Why `exe` could not start when its exec failed with `err`, if the file says: its `#!`
/// interpreter has a carriage return in its name, does not exist, or is not executable; or the
/// kernel cannot load it at all (ENOEXEC: the error with what the file is). None: the error says
/// it as it is.
pub fn why_not_started(exe: &Path, err: &std::io::Error) -> Option<String> {
    let errno = err.raw_os_error();
    if !matches!(errno, Some(libc::ENOENT | libc::EACCES | libc::ENOEXEC)) {
        return None;
    }
    let mut head = Vec::with_capacity(HEAD);
    std::fs::File::open(exe)
        .ok()?
        .take(HEAD as u64)
        .read_to_end(&mut head)
        .ok()?;
    if errno == Some(libc::ENOEXEC) {
        return Some(format!("{err}: {}", not_loadable(&head)));
    }
    if head.starts_with(b"\x7fELF") {
        return elf_loader_missing(exe);
    }
    let name = interpreter(&head)?;
    let shown = crate::text::escape_bytes(name);
    if line(&head)?.contains(&b'\r') {
        return Some(format!(
            "it has Windows line endings: its #! line names the interpreter \"{shown}\" (with a carriage return), which does not exist; convert it (dos2unix)"
        ));
    }
    if !name.starts_with(b"/") {
        return Some(format!(
            "its #! interpreter \"{shown}\" is no absolute path, and the kernel looks in no PATH for it (write #!/usr/bin/env {shown})"
        ));
    }
    match std::fs::metadata(OsStr::from_bytes(name)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(format!(
            "its #! interpreter \"{shown}\" does not exist on this machine"
        )),
        Err(e) => Some(format!(
            "its #! interpreter \"{shown}\" cannot be used: {e}"
        )),
        Ok(m) if !m.is_file() || m.permissions().mode() & 0o111 == 0 => Some(format!(
            "its #! interpreter \"{shown}\" is not an executable file"
        )),
        Ok(_) => None,
    }
}

/// What a file the kernel refused to load (ENOEXEC) is, from its first bytes.
fn not_loadable(head: &[u8]) -> String {
    if head.starts_with(b"#!") {
        return match interpreter(head) {
            None => "its #! line names no interpreter".to_string(),
            Some(name) => format!(
                "its #! interpreter \"{}\" is a file the kernel cannot load either (a program for another machine?)",
                crate::text::escape_bytes(name)
            ),
        };
    }
    if !head.starts_with(b"\x7fELF") {
        return "no #! line and no ELF header: jobs run without a shell (add a line such as #!/bin/sh)".to_string();
    }
    let machine = match (head.get(5), head.get(18..20)) {
        (Some(1), Some(&[a, b])) => u16::from_le_bytes([a, b]),
        (Some(2), Some(&[a, b])) => u16::from_be_bytes([a, b]),
        _ => return "an ELF program cut short or damaged (copied only in part?)".to_string(),
    };
    let ours = MACHINES
        .iter()
        .find(|m| m.1 == std::env::consts::ARCH)
        .map(|m| m.0);
    if ours.is_some_and(|ours| ours != machine) {
        let name = |m: u16| {
            MACHINES
                .iter()
                .find(|k| k.0 == m)
                .map_or_else(|| format!("machine {m}"), |k| k.2.to_string())
        };
        return format!(
            "an ELF program for {}, and this machine is {}: build it for this one",
            name(machine),
            name(ours.unwrap_or_default())
        );
    }
    "an ELF program this kernel cannot load (cut short or damaged: copied only in part?)"
        .to_string()
}

/// ELF `e_machine` numbers, Rust's name of the architecture, and the name a person knows.
const MACHINES: [(u16, &str, &str); 10] = [
    (3, "x86", "x86 (32-bit)"),
    (8, "mips64", "MIPS"),
    (20, "powerpc", "PowerPC (32-bit)"),
    (21, "powerpc64", "PowerPC64"),
    (22, "s390x", "S390"),
    (40, "arm", "ARM (32-bit)"),
    (62, "x86_64", "x86-64"),
    (183, "aarch64", "AArch64"),
    (243, "riscv64", "RISC-V"),
    (258, "loongarch64", "LoongArch"),
];

/// An ELF program whose dynamic loader (its `PT_INTERP`) is not on this machine (built against
/// musl and run on glibc, a 32-bit program on a system without 32-bit libraries, or for another
/// distribution): the kernel says "No such file or directory" of the program. None for anything
/// else.
fn elf_loader_missing(exe: &Path) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(exe).ok()?;
    let mut h = [0u8; 64];
    f.read_exact_at(&mut h, 0).ok()?;
    // EI_CLASS 1 or 2 (32- or 64-bit), EI_DATA 1 or 2 (little- or big-endian).
    let (wide, little) = match (h[4], h[5]) {
        (c @ (1 | 2), d @ (1 | 2)) => (c == 2, d == 1),
        _ => return None,
    };
    let int = |b: &[u8], at: usize, len: usize| -> Option<u64> {
        let b = b.get(at..at + len)?;
        let fold = |n: u64, &x: &u8| n << 8 | u64::from(x);
        Some(match little {
            true => b.iter().rev().fold(0, fold),
            false => b.iter().fold(0, fold),
        })
    };
    // e_phoff, e_phentsize, e_phnum; and in a program header p_offset and p_filesz.
    let (phoff, phentsize, phnum) = match wide {
        true => (int(&h, 32, 8)?, int(&h, 54, 2)?, int(&h, 56, 2)?),
        false => (int(&h, 28, 4)?, int(&h, 42, 2)?, int(&h, 44, 2)?),
    };
    let (offset_at, size_at, word) = if wide { (8, 32, 8) } else { (4, 16, 4) };
    for i in 0..phnum.min(64) {
        let mut ph = [0u8; 56];
        let at = phoff.checked_add(i.checked_mul(phentsize)?)?;
        f.read_exact_at(&mut ph[..if wide { 56 } else { 32 }], at)
            .ok()?;
        // PT_INTERP: the loader's path, NUL-terminated.
        if int(&ph, 0, 4)? == 3 {
            let (offset, size) = (
                int(&ph, offset_at, word)?,
                int(&ph, size_at, word)?.min(4096),
            );
            let mut path = vec![0u8; usize::try_from(size).ok()?];
            f.read_exact_at(&mut path, offset).ok()?;
            let path = path.split(|&b| b == 0).next()?;
            if Path::new(OsStr::from_bytes(path)).exists() {
                return None;
            }
            return Some(format!(
                "its dynamic loader \"{}\" does not exist on this machine (a program built for another C library or system, or a 32-bit program without the 32-bit libraries: link it statically, or build it here)",
                crate::text::escape_bytes(path)
            ));
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_interpreter_is_split_as_the_kernel_splits_it() {
        assert_eq!(interpreter(b"#!/bin/sh\necho"), Some(&b"/bin/sh"[..]));
        assert_eq!(
            interpreter(b"#! /usr/bin/env python3 -u\n"),
            Some(&b"/usr/bin/env"[..])
        );
        assert_eq!(
            interpreter(b"#!/bin/sh\r\necho\r\n"),
            Some(&b"/bin/sh\r"[..])
        );
        assert_eq!(interpreter(b"\x7fELF"), None);
        assert_eq!(interpreter(b"#!"), None);
        let w = line_endings_warning(Path::new("jobs/dos"), b"#!/bin/sh\r\n").unwrap();
        assert!(w.contains("\"/bin/sh\\r\""), "{w}");
        assert_eq!(
            line_endings_warning(Path::new("jobs/ok"), b"#!/bin/sh\n"),
            None
        );
        // A program whose loader is here is nothing to say.
        assert_eq!(elf_loader_missing(Path::new("/bin/true")), None);
    }

    /// An ELF file of one header and one `PT_INTERP` program header naming `loader`, in either
    /// class and byte order (the fields the kernel reads to find the loader, nothing to run).
    fn elf(wide: bool, little: bool, loader: &str) -> Vec<u8> {
        let n = |v: u64, len: usize| -> Vec<u8> {
            let b = v.to_be_bytes()[8 - len..].to_vec();
            if little {
                b.into_iter().rev().collect()
            } else {
                b
            }
        };
        let (word, header, entry) = if wide { (8, 64, 56) } else { (4, 52, 32) };
        let at = (header + entry) as u64;
        let mut f = vec![
            0x7f,
            b'E',
            b'L',
            b'F',
            1 + u8::from(wide),
            2 - u8::from(little),
            1,
        ];
        f.resize(16, 0);
        // e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize,
        // e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx.
        for (v, len) in [
            (2, 2),
            (8, 2),
            (1, 4),
            (0, word),
            (header as u64, word),
            (0, word),
        ] {
            f.extend(n(v, len));
        }
        for (v, len) in [
            (0, 4),
            (header as u64, 2),
            (entry as u64, 2),
            (1, 2),
            (0, 6),
        ] {
            f.extend(n(v, len));
        }
        let len = loader.len() as u64 + 1;
        let fields: &[(u64, usize)] = match wide {
            // p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align.
            true => &[
                (3, 4),
                (4, 4),
                (at, 8),
                (0, 8),
                (0, 8),
                (len, 8),
                (len, 8),
                (1, 8),
            ],
            // p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align.
            false => &[
                (3, 4),
                (at, 4),
                (0, 4),
                (0, 4),
                (len, 4),
                (len, 4),
                (4, 4),
                (1, 4),
            ],
        };
        for &(v, len) in fields {
            f.extend(n(v, len));
        }
        f.extend(loader.as_bytes());
        f.push(0);
        f
    }

    #[test]
    fn a_missing_loader_is_found_in_every_class_and_byte_order() {
        let dir = crate::testutil::tempdir("shebang", "loaders");
        for (wide, little) in [(true, true), (false, true), (true, false), (false, false)] {
            let exe = dir.join(format!("elf-{wide}-{little}"));
            std::fs::write(&exe, elf(wide, little, "/lib/ld-gearshift-test.so.1")).unwrap();
            let said = elf_loader_missing(&exe).unwrap_or_default();
            assert!(
                said.contains("\"/lib/ld-gearshift-test.so.1\" does not exist"),
                "{wide} {little}: {said}"
            );
            std::fs::write(&exe, elf(wide, little, "/bin/sh")).unwrap();
            assert_eq!(elf_loader_missing(&exe), None, "{wide} {little}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
