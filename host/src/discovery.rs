//! Where backend plugins are looked for, and which files there are candidates.
//! Pure path logic: no library is opened here, so it is unit-tested without plugins.

use std::path::{Path, PathBuf};

/// Why a directory is searched; shown in the selection report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// `--backend-dir DIR`.
    Flag,
    /// `LLAMA_BACKEND_PATH`.
    Env,
    /// The directory of the running executable.
    ExeDir,
    /// `../lib/llama/backends` beside the executable (an installed layout).
    ExeLib,
    /// The per-user data directory.
    User,
}

impl Origin {
    /// Beside the executable only files named like a backend are candidates (the directory
    /// holds other things); in a dedicated backends directory every shared-library-looking
    /// file is, so a foreign or broken file dropped there is reported, not silently skipped.
    fn dedicated(self) -> bool {
        !matches!(self, Origin::ExeDir)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchDir {
    pub dir: PathBuf,
    pub origin: Origin,
}

/// The platform's shared-library file extension.
pub const LIB_EXT: &str = std::env::consts::DLL_EXTENSION;
/// The file-name prefix of every backend plugin (`libllama_backend_cpu.so`).
pub const PLUGIN_PREFIX: &str = if cfg!(windows) { "llama_backend_" } else { "libllama_backend_" };

/// The per-user backends directory: `$XDG_DATA_HOME/llama/backends`, else
/// `~/.local/share/llama/backends` (`~/Library/Application Support/llama/backends` on macOS).
pub fn user_backends_dir() -> Option<PathBuf> {
    user_data_dir().map(|d| d.join("backends"))
}

/// Where models are looked for by default: `$LLAMA_MODELS_DIR`, else the per-user data
/// directory's `models/` (where scripts/fetch-model puts the default model).
pub fn default_models_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("LLAMA_MODELS_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    user_data_dir().map(|d| d.join("models"))
}

/// Why a model name was not looked up in a models directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelNameError {
    #[error("'{name}' is not a model name: a name is a file name in the models directory, without '/', '\\' or a leading '.'")]
    NotAName { name: String },
    #[error("'{name}' leads outside the models directory")]
    Escapes { name: String },
    #[error("'{name}' could be any of {}: give more of the name", candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    Ambiguous { name: String, candidates: Vec<PathBuf> },
}

/// The file a model *name* means in `dir` (`name` or `name.gguf`), if one exists. A name is
/// a plain file name: separators, `.`/`..`, hidden names and absolute paths are refused,
/// and so is a file that resolves (through a symlink) outside `dir`, so a name that came
/// from a request or a config can never reach another file.
pub fn find_model_in(dir: &Path, name: &str) -> Result<Option<PathBuf>, ModelNameError> {
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && Path::new(name).components().count() == 1
        && !Path::new(name).is_absolute();
    if !plain {
        return Err(ModelNameError::NotAName { name: name.to_string() });
    }
    let Ok(root) = std::fs::canonicalize(dir) else { return Ok(None) };
    for candidate in [dir.join(name), dir.join(format!("{name}.gguf"))] {
        if !candidate.is_file() {
            continue;
        }
        let real = std::fs::canonicalize(&candidate).map_err(|_| ModelNameError::Escapes { name: name.to_string() })?;
        if !real.starts_with(&root) {
            return Err(ModelNameError::Escapes { name: name.to_string() });
        }
        return Ok(Some(candidate));
    }
    Ok(None)
}

/// The model file a *name* means in the models directories `dirs`, searched in order: the
/// file `name` or `name.gguf` (its stem) in the first directory that has one, else the one
/// `.gguf` file across all of them whose name starts with `name` (`gemma` finds
/// `gemma-3-270m-q4_k_m.gguf`). Several such files are [`ModelNameError::Ambiguous`],
/// listing them; the rules of [`find_model_in`] hold for every candidate.
pub fn find_model(dirs: &[PathBuf], name: &str) -> Result<Option<PathBuf>, ModelNameError> {
    for dir in dirs {
        if let Some(p) = find_model_in(dir, name)? {
            return Ok(Some(p));
        }
    }
    let mut candidates = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        let mut here: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|f| f.starts_with(name) && f.ends_with(".gguf") && !f.starts_with('.'))
            .filter_map(|f| find_model_in(dir, &f).transpose())
            .collect::<Result<_, _>>()?;
        here.sort();
        candidates.extend(here);
    }
    match candidates.len() {
        0 => Ok(None),
        1 => Ok(candidates.pop()),
        _ => Err(ModelNameError::Ambiguous { name: name.to_string(), candidates }),
    }
}

fn user_data_dir() -> Option<PathBuf> {
    let home = || std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from);
    if cfg!(target_os = "macos") {
        return home().map(|h| h.join("Library/Application Support/llama"));
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(xdg).join("llama"));
    }
    home().map(|h| h.join(".local/share/llama"))
}

/// The search order: flag directories, then `LLAMA_BACKEND_PATH` entries, then the
/// executable's directory and `../lib/llama/backends` beside it, then the per-user directory.
/// Duplicates keep their first position.
pub fn search_dirs(flag_dirs: &[PathBuf], env_path: Option<&str>, exe: Option<&Path>, user: Option<PathBuf>) -> Vec<SearchDir> {
    let mut dirs = Vec::new();
    let mut push = |dir: PathBuf, origin: Origin| {
        if !dir.as_os_str().is_empty() && !dirs.iter().any(|d: &SearchDir| d.dir == dir) {
            dirs.push(SearchDir { dir, origin });
        }
    };
    for d in flag_dirs {
        push(d.clone(), Origin::Flag);
    }
    if let Some(paths) = env_path {
        for d in std::env::split_paths(paths) {
            push(d, Origin::Env);
        }
    }
    if let Some(exe_dir) = exe.and_then(Path::parent) {
        push(exe_dir.to_path_buf(), Origin::ExeDir);
        if let Some(prefix) = exe_dir.parent() {
            push(prefix.join("lib").join("llama").join("backends"), Origin::ExeLib);
        }
    }
    if let Some(u) = user {
        push(u, Origin::User);
    }
    dirs
}

/// Whether a file name looks like a candidate in a directory of this origin.
pub fn is_candidate_name(name: &str, origin: Origin) -> bool {
    let looks_like_lib = name.ends_with(&format!(".{LIB_EXT}")) || name.contains(&format!(".{LIB_EXT}."));
    if origin.dedicated() {
        looks_like_lib
    } else {
        looks_like_lib && name.starts_with(PLUGIN_PREFIX)
    }
}

/// Candidate plugin files in one directory, sorted by name for a stable order.
/// A missing or unreadable directory has no candidates.
pub fn candidates_in(dir: &SearchDir) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(&dir.dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().map(|t| t.is_file() || t.is_symlink()).unwrap_or(false))
        .filter(|e| e.file_name().to_str().is_some_and(|n| is_candidate_name(n, dir.origin)))
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_cannot_leave_the_models_directory() {
        let root = tempfile::tempdir().unwrap();
        let models = root.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        std::fs::write(models.join("good.gguf"), b"GGUF").unwrap();
        std::fs::write(root.path().join("secret.gguf"), b"GGUF").unwrap();
        std::os::unix::fs::symlink(root.path().join("secret.gguf"), models.join("link.gguf")).unwrap();
        assert_eq!(find_model_in(&models, "good").unwrap(), Some(models.join("good.gguf")));
        assert_eq!(find_model_in(&models, "good.gguf").unwrap(), Some(models.join("good.gguf")));
        assert_eq!(find_model_in(&models, "missing").unwrap(), None);
        for bad in ["../secret", "../secret.gguf", "..", ".", "", ".hidden", "/etc/passwd", "a/b", "sub\\x", "nul\0x"] {
            assert!(matches!(find_model_in(&models, bad), Err(ModelNameError::NotAName { .. })), "{bad:?} was looked up");
        }
        // A symlink inside the directory that points outside it.
        assert!(matches!(find_model_in(&models, "link"), Err(ModelNameError::Escapes { .. })));
    }

    #[test]
    fn model_names_match_by_stem_then_by_unique_prefix() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("gemma-3-270m-q4_k_m.gguf"), b"GGUF").unwrap();
        std::fs::write(b.join("llama-3.2-1b.gguf"), b"GGUF").unwrap();
        std::fs::write(b.join("llama-3.2-3b.gguf"), b"GGUF").unwrap();
        std::fs::write(b.join("notes.txt"), b"x").unwrap();
        let dirs = vec![a.clone(), b.clone()];
        assert_eq!(find_model(&dirs, "gemma-3-270m-q4_k_m").unwrap(), Some(a.join("gemma-3-270m-q4_k_m.gguf")));
        assert_eq!(find_model(&dirs, "gemma").unwrap(), Some(a.join("gemma-3-270m-q4_k_m.gguf")));
        assert_eq!(find_model(&dirs, "llama-3.2-3").unwrap(), Some(b.join("llama-3.2-3b.gguf")));
        assert_eq!(find_model(&dirs, "notes").unwrap(), None, "only .gguf files match a prefix");
        assert_eq!(find_model(&dirs, "mistral").unwrap(), None);
        match find_model(&dirs, "llama") {
            Err(ModelNameError::Ambiguous { candidates, .. }) => assert_eq!(candidates, vec![b.join("llama-3.2-1b.gguf"), b.join("llama-3.2-3b.gguf")]),
            other => panic!("{other:?}"),
        }
        // An exact stem wins over longer names that share it.
        std::fs::write(b.join("llama.gguf"), b"GGUF").unwrap();
        assert_eq!(find_model(&dirs, "llama").unwrap(), Some(b.join("llama.gguf")));
        assert!(matches!(find_model(&dirs, "../a/gemma"), Err(ModelNameError::NotAName { .. })));
    }

    #[test]
    fn search_order_is_flag_env_exe_lib_user_without_duplicates() {
        let exe = Path::new("/opt/llama/bin/llama");
        let env = std::env::join_paths(["/env/a", "/flag"]).unwrap();
        let dirs = search_dirs(
            &[PathBuf::from("/flag")],
            env.to_str(),
            Some(exe),
            Some(PathBuf::from("/home/u/.local/share/llama/backends")),
        );
        let got: Vec<(&str, Origin)> = dirs.iter().map(|d| (d.dir.to_str().unwrap(), d.origin)).collect();
        assert_eq!(
            got,
            vec![
                ("/flag", Origin::Flag),
                ("/env/a", Origin::Env),
                ("/opt/llama/bin", Origin::ExeDir),
                ("/opt/llama/lib/llama/backends", Origin::ExeLib),
                ("/home/u/.local/share/llama/backends", Origin::User),
            ]
        );
    }

    #[test]
    fn empty_env_entries_are_ignored() {
        let dirs = search_dirs(&[], Some(""), None, None);
        assert!(dirs.is_empty());
    }

    #[test]
    fn exe_dir_only_takes_backend_named_libraries() {
        let lib = format!("{PLUGIN_PREFIX}cpu.{LIB_EXT}");
        assert!(is_candidate_name(&lib, Origin::ExeDir));
        assert!(!is_candidate_name(&format!("libllama_host.{LIB_EXT}"), Origin::ExeDir));
        assert!(!is_candidate_name("llama", Origin::ExeDir));
        assert!(!is_candidate_name(&format!("{PLUGIN_PREFIX}cpu.d"), Origin::ExeDir));
    }

    #[test]
    fn dedicated_dirs_take_any_library_but_not_other_files() {
        assert!(is_candidate_name(&format!("garbage.{LIB_EXT}"), Origin::User));
        assert!(is_candidate_name(&format!("libfoo.{LIB_EXT}.1"), Origin::Flag));
        assert!(!is_candidate_name("README.md", Origin::Env));
    }

    #[test]
    fn candidates_are_sorted_and_missing_dirs_are_empty() {
        let tmp = tempfile::tempdir().unwrap();
        for name in [format!("b.{LIB_EXT}"), format!("a.{LIB_EXT}"), "notes.txt".to_string()] {
            std::fs::write(tmp.path().join(name), b"x").unwrap();
        }
        std::fs::create_dir(tmp.path().join(format!("dir.{LIB_EXT}"))).unwrap();
        let dir = SearchDir { dir: tmp.path().to_path_buf(), origin: Origin::Flag };
        let names: Vec<String> =
            candidates_in(&dir).iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec![format!("a.{LIB_EXT}"), format!("b.{LIB_EXT}")]);
        let missing = SearchDir { dir: tmp.path().join("nope"), origin: Origin::Flag };
        assert!(candidates_in(&missing).is_empty());
    }
}
