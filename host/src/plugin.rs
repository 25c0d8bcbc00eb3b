//! Opening one backend library and turning every way it can fail into a sentence a user
//! understands. A library is checked (name, ABI version, layout, CPU features) before any
//! of its functions is called. Libraries are never unloaded (abi_stable leaks them), so a
//! swapped backend needs a restart.

use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibraryError};
use llama_plugin_api::{BackendInfo, BackendModRef, ProbeReport, ABI_VERSION, ROOT_MODULE_NAME};

use crate::hardware;

/// Why a candidate file is not used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PluginError {
    #[error("not a shared library ({detail})")]
    NotALibrary { detail: String },
    #[error("cannot be loaded: {detail}")]
    LoadFailed { detail: String },
    #[error("not a llama backend ({detail})")]
    NotABackend { detail: String },
    #[error("built for plugin ABI {found}, host expects {expected}")]
    AbiVersion { found: String, expected: String },
    #[error("built against an incompatible build of plugin ABI {expected}; rebuild it against this host")]
    AbiLayout { expected: String },
    #[error("needs CPU features this CPU lacks: {}", missing.join(" "))]
    CpuFeatures { missing: Vec<String> },
    /// A refusal reported by a probe in a child process (already a sentence).
    #[error("{detail}")]
    Refused { detail: String },
    /// Its probe crashed or hung in a child process.
    #[error("{detail}")]
    Crashed { detail: String },
}

impl PluginError {
    /// A stable machine-readable tag for `--json`.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::NotALibrary { .. } => "not-a-library",
            PluginError::LoadFailed { .. } => "load-failed",
            PluginError::NotABackend { .. } => "not-a-backend",
            PluginError::AbiVersion { .. } => "abi-version",
            PluginError::AbiLayout { .. } => "abi-layout",
            PluginError::CpuFeatures { .. } => "cpu-features",
            PluginError::Refused { .. } => "refused",
            PluginError::Crashed { .. } => "probe-crashed",
        }
    }
}

/// A backend library that passed every check, with what it said about itself.
pub(crate) struct Plugin {
    pub(crate) info: BackendInfo,
    pub(crate) probe: ProbeReport,
}

/// dlopen's message starts with the path; the report already shows it.
fn strip_path(detail: &str, path: &Path) -> String {
    let p = path.display().to_string();
    detail.strip_prefix(&p).map(|s| s.trim_start_matches(':').trim()).unwrap_or(detail).to_string()
}

/// Shared-library magic numbers: ELF, Mach-O (both byte orders, 32/64, fat), PE.
fn looks_like_shared_library(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let Ok(mut f) = std::fs::File::open(path) else { return false };
    if f.read_exact(&mut magic).is_err() {
        return false;
    }
    matches!(
        magic,
        [0x7f, b'E', b'L', b'F']
            | [0xfe, 0xed, 0xfa, 0xce | 0xcf]
            | [0xce | 0xcf, 0xfa, 0xed, 0xfe]
            | [0xca, 0xfe, 0xba, 0xbe]
            | [b'M', b'Z', _, _]
    )
}

/// What to do about a library a plugin needs and the system lacks, for the ones users
/// meet: the GPU runtimes the CUDA plugin links.
fn missing_library_hint(detail: &str) -> Option<String> {
    let lib = ["libcublasLt.so.", "libcublas.so.", "libcudart.so."].iter().find_map(|l| detail.find(l).map(|at| (at, l.len())))?;
    // The major version the plugin was built against, from the missing file's name.
    let major: String = detail[lib.0 + lib.1..].chars().take_while(char::is_ascii_digit).collect();
    let cuda = if major.is_empty() { "CUDA".to_string() } else { format!("CUDA {major}") };
    let driver = match hardware::cuda_driver() {
        Ok(d) => format!("NVIDIA driver {} found", hardware::cuda_version_string(d.version)),
        Err(reason) => format!("no usable NVIDIA driver here either: {reason}"),
    };
    Some(format!(
        "the CUDA plugin needs the {cuda} runtime libraries (cuBLAS, cudart): install the CUDA toolkit or add its lib directory to LD_LIBRARY_PATH; {driver}"
    ))
}

fn translate(err: LibraryError, path: &Path) -> PluginError {
    match err {
        LibraryError::OpenError { err, .. } => {
            let detail = strip_path(&err.to_string(), path);
            if looks_like_shared_library(path) {
                let detail = match missing_library_hint(&detail) {
                    Some(hint) => format!("{detail} ({hint})"),
                    None => detail,
                };
                PluginError::LoadFailed { detail }
            } else {
                PluginError::NotALibrary { detail }
            }
        }
        LibraryError::GetSymbolError { .. } => {
            PluginError::NotABackend { detail: "a shared library without the llama plugin entry point".into() }
        }
        LibraryError::InvalidAbiHeader(_) | LibraryError::InvalidCAbi { .. } => {
            PluginError::NotABackend { detail: "built with an incompatible abi_stable".into() }
        }
        LibraryError::ParseVersionError(e) => PluginError::NotABackend { detail: format!("unreadable version: {e}") },
        LibraryError::IncompatibleVersionNumber { actual_version, expected_version, .. } => {
            PluginError::AbiVersion { found: actual_version.to_string(), expected: expected_version.to_string() }
        }
        LibraryError::AbiInstability(_) => PluginError::AbiLayout { expected: ABI_VERSION.to_string() },
        LibraryError::RootModule { err, .. } => {
            PluginError::LoadFailed { detail: format!("its entry point failed: {err}") }
        }
        other => PluginError::LoadFailed { detail: other.to_string() },
    }
}

/// Opens and checks one candidate file, without probing it: the module and its info.
pub(crate) fn load(path: &Path) -> Result<(BackendModRef, BackendInfo), PluginError> {
    // Before opening: the library's static initialisers already use its instruction set.
    check_declared_cpu_features(path)?;
    let header = lib_header_from_path(path).map_err(|e| translate(e, path))?;
    let name = header.root_mod_consts().name();
    if name.as_str() != ROOT_MODULE_NAME {
        return Err(PluginError::NotABackend { detail: format!("an abi_stable plugin of another kind, '{name}'") });
    }
    let module: BackendModRef = header.init_root_module::<BackendModRef>().map_err(|e| translate(e, path))?;
    let required = module.required_cpu_features();
    let missing = hardware::missing_cpu_features(required.iter().map(|f| f.as_str()), hardware::cpu_has);
    if !missing.is_empty() {
        return Err(PluginError::CpuFeatures { missing });
    }
    let info = (module.info())();
    Ok((module, info))
}

/// Refuses a library whose ELF note (see `cpu_note`) lists CPU features this CPU lacks,
/// without opening it.
pub(crate) fn check_declared_cpu_features(path: &Path) -> Result<(), PluginError> {
    let Some(required) = crate::cpu_note::declared_cpu_features(path) else { return Ok(()) };
    let missing = hardware::missing_cpu_features(required.iter().map(String::as_str), hardware::cpu_has);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PluginError::CpuFeatures { missing })
    }
}

/// Opens, checks and probes one candidate file.
pub(crate) fn open(path: &Path) -> Result<Plugin, PluginError> {
    let (module, info) = load(path)?;
    let probe = (module.probe())();
    Ok(Plugin { info, probe })
}

/// Why `llama backends install` refused a file.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: no such file")]
    NotFound { path: PathBuf },
    #[error("{path}: refused: {reason}")]
    Refused { path: PathBuf, reason: PluginError },
    #[error("no per-user data directory (HOME is not set)")]
    NoUserDir,
    #[error("cannot copy into {dir}")]
    Copy { dir: PathBuf, #[source] source: std::io::Error },
}

/// Checks that `file` loads as a backend with this host's ABI (in a child process when
/// `isolation` is given, so a library that crashes when opened cannot take the host down),
/// then copies it into `dir` (atomically: a copy then a rename). Returns the installed path
/// and the backend's name, version and llama.cpp build.
pub fn install_backend(file: &Path, dir: &Path, isolation: Option<&crate::probe::Isolation>) -> Result<(PathBuf, [String; 3]), InstallError> {
    use crate::probe::{self, ProbeOutcome};
    if !file.is_file() {
        return Err(InstallError::NotFound { path: file.to_path_buf() });
    }
    let refused = |reason| InstallError::Refused { path: file.to_path_buf(), reason };
    let outcome = match isolation {
        Some(iso) => probe::isolated(&probe::Isolation { cache: None, ..iso.clone() }, file),
        None => probe::in_process(file),
    };
    let about = match outcome {
        ProbeOutcome::Probed { name, version, llama_build, .. } => [name, version, llama_build],
        ProbeOutcome::Rejected { reason, .. } => return Err(refused(PluginError::Refused { detail: reason })),
        ProbeOutcome::Crashed { reason } => return Err(refused(PluginError::Crashed { detail: reason })),
    };
    let name = file.file_name().ok_or_else(|| InstallError::NotFound { path: file.to_path_buf() })?;
    let copy_err = |source| InstallError::Copy { dir: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(copy_err)?;
    let dest = dir.join(name);
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    std::fs::copy(file, &tmp).map_err(copy_err)?;
    std::fs::rename(&tmp, &dest).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        copy_err(e)
    })?;
    Ok((dest, about))
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dlopen_detail_loses_its_path_prefix() {
        let p = Path::new("/tmp/x.so");
        assert_eq!(strip_path("/tmp/x.so: invalid ELF header", p), "invalid ELF header");
        assert_eq!(strip_path("something else", p), "something else");
    }

    #[test]
    fn a_text_file_is_not_a_shared_library() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("garbage.so");
        std::fs::write(&f, b"hello, not a library").unwrap();
        assert!(!looks_like_shared_library(&f));
        match open(&f) {
            Err(PluginError::NotALibrary { .. }) => {}
            Err(other) => panic!("wrong rejection: {other}"),
            Ok(_) => panic!("a text file loaded as a plugin"),
        }
    }

    #[test]
    fn a_missing_cuda_runtime_gets_a_hint() {
        let hint = missing_library_hint("libcublas.so.13: cannot open shared object file: No such file or directory").unwrap();
        assert!(hint.starts_with("the CUDA plugin needs the CUDA 13 runtime libraries"), "{hint}");
        assert_eq!(missing_library_hint("libfoo.so.1: cannot open shared object file"), None);
        assert!(missing_library_hint("libcudart.so.12: cannot open shared object file").unwrap().contains("needs the CUDA 12 runtime"));
    }

    #[test]
    fn error_kinds_are_stable() {
        let e = PluginError::AbiVersion { found: "9.0.0".into(), expected: "5.0.0".into() };
        assert_eq!(e.kind(), "abi-version");
        assert_eq!(e.to_string(), "built for plugin ABI 9.0.0, host expects 5.0.0");
    }
}
