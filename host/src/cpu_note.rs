//! The CPU features a backend library declares in its `.llama_cpu_features` ELF section,
//! read from the file without opening it as a library.
//!
//! Opening a library runs its static initialisers, and llama.cpp's are compiled for the
//! instruction set the plugin was built for: on a CPU without it they die with SIGILL before
//! the root module's own feature list can be read. The note lets the host refuse such a
//! plugin, naming the features, in any process. Files without the note (another format, an
//! older plugin) fall back to the root module's list, checked after opening.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

const SECTION: &[u8] = b".llama_cpu_features";
const PREFIX: &[u8] = b"llama-cpu-features:v1:";
/// Bounds on what is read from a file that may be anything a user dropped in a directory.
const MAX_SECTION_TABLE: u64 = 1 << 22;
const MAX_STRTAB: u64 = 1 << 20;
const MAX_NOTE: u64 = 4096;

/// The features the note lists; `None` when the file is not a 64-bit little-endian ELF or
/// carries no note.
pub(crate) fn declared_cpu_features(path: &Path) -> Option<Vec<String>> {
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh).ok()?;
    // ELF magic, 64-bit class, little-endian.
    if eh[..4] != [0x7f, b'E', b'L', b'F'] || eh[4] != 2 || eh[5] != 1 {
        return None;
    }
    let shoff = u64::from_le_bytes(eh[0x28..0x30].try_into().ok()?);
    let shentsize = u16::from_le_bytes([eh[0x3a], eh[0x3b]]) as u64;
    let shnum = u16::from_le_bytes([eh[0x3c], eh[0x3d]]) as u64;
    let shstrndx = u16::from_le_bytes([eh[0x3e], eh[0x3f]]) as u64;
    if shentsize != 64 || shnum == 0 || shstrndx >= shnum {
        return None;
    }
    let table_len = shnum * 64;
    if table_len > MAX_SECTION_TABLE || shoff.checked_add(table_len)? > len {
        return None;
    }
    let table = read_at(&mut f, shoff, table_len)?;
    let section = |i: u64| -> (u32, u64, u64) {
        let h = &table[(i * 64) as usize..(i * 64 + 64) as usize];
        let name = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
        let offset = u64::from_le_bytes(h[24..32].try_into().expect("8 bytes"));
        let size = u64::from_le_bytes(h[32..40].try_into().expect("8 bytes"));
        (name, offset, size)
    };
    let (_, str_off, str_size) = section(shstrndx);
    if str_size > MAX_STRTAB || str_off.checked_add(str_size)? > len {
        return None;
    }
    let strtab = read_at(&mut f, str_off, str_size)?;
    for i in 0..shnum {
        let (name, offset, size) = section(i);
        let name = strtab.get(name as usize..)?;
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        if name != SECTION {
            continue;
        }
        if size > MAX_NOTE || offset.checked_add(size)? > len {
            return None;
        }
        let note = read_at(&mut f, offset, size)?;
        let list = note.strip_prefix(PREFIX)?;
        let list = std::str::from_utf8(list).ok()?.trim_end_matches('\0');
        return Some(list.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect());
    }
    None
}

fn read_at(f: &mut File, offset: u64, len: u64) -> Option<Vec<u8>> {
    f.seek(SeekFrom::Start(offset)).ok()?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).ok()?;
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_elf_declares_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.so");
        std::fs::write(&p, b"just text, not a library").unwrap();
        assert_eq!(declared_cpu_features(&p), None);
        // A header claiming a section table past the end of the file.
        let mut eh = vec![0u8; 64];
        eh[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        eh[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        eh[0x3a] = 64;
        eh[0x3c] = 3;
        eh[0x3e] = 1;
        std::fs::write(&p, &eh).unwrap();
        assert_eq!(declared_cpu_features(&p), None);
    }
}
