//! The selection report: every candidate the host looked at, with its verdict and reason.
//! Printed by `llama backends` (text or JSON) and logged at start-up with -v.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::discovery::Origin;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The backend in use.
    Selected,
    /// Works here, but another was preferred.
    Usable,
    /// Loaded fine, but cannot run on this machine.
    Unusable,
    /// The file was refused before any of its code ran.
    Rejected,
    /// A known backend with no plugin file found.
    NotFound,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Selected => "selected",
            Verdict::Usable => "usable",
            Verdict::Unusable => "unusable",
            Verdict::Rejected => "rejected",
            Verdict::NotFound => "not found",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct DeviceReport {
    pub name: String,
    pub description: String,
    pub memory_total: u64,
    pub memory_free: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CandidateReport {
    /// Backend name (`cpu`, `cuda`, ...) when known; for a rejected file, its file name.
    pub name: String,
    pub path: Option<PathBuf>,
    pub verdict: Verdict,
    pub score: Option<u32>,
    pub reason: String,
    /// Machine-readable rejection kind (`not-a-library`, `abi-version`, ...).
    pub rejection: Option<String>,
    pub version: Option<String>,
    pub llama_build: Option<String>,
    pub devices: Vec<DeviceReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SearchDirReport {
    pub dir: PathBuf,
    pub origin: Origin,
    pub exists: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SelectionReport {
    pub host_abi: &'static str,
    pub search_dirs: Vec<SearchDirReport>,
    pub candidates: Vec<CandidateReport>,
}

impl CandidateReport {
    /// A row for a GPU backend (found or not): the rows that answer "why is my GPU not
    /// used?" and the ones a layer-fit estimate is made for.
    pub fn is_gpu(&self) -> bool {
        matches!(self.name.as_str(), "cuda" | "metal")
    }
}

impl SelectionReport {
    pub fn selected(&self) -> Option<&CandidateReport> {
        self.candidates.iter().find(|c| c.verdict == Verdict::Selected)
    }
}

impl fmt::Display for SelectionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.candidates.iter().map(|c| c.name.len()).max().unwrap_or(4).max(7);
        writeln!(f, "{:width$}  {:9}  {:>5}  details", "backend", "verdict", "score")?;
        for c in &self.candidates {
            let score = c.score.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
            writeln!(f, "{:width$}  {:9}  {:>5}  {}", c.name, c.verdict.to_string(), score, c.reason)?;
            let indent = " ".repeat(width + 20);
            if let Some(p) = &c.path {
                writeln!(f, "{indent}path: {}", p.display())?;
            }
            if let (Some(v), Some(b)) = (&c.version, &c.llama_build) {
                writeln!(f, "{indent}version {v}, {b}")?;
            }
            for d in &c.devices {
                let mem = if d.memory_total > 0 && d.memory_free == 0 {
                    format!(", {:.1} GiB", gib(d.memory_total))
                } else if d.memory_total > 0 {
                    format!(", {:.1} GiB free of {:.1} GiB", gib(d.memory_free), gib(d.memory_total))
                } else {
                    String::new()
                };
                writeln!(f, "{indent}device {}: {}{mem}", d.name, d.description)?;
            }
        }
        writeln!(f, "searched (plugin ABI {}):", self.host_abi)?;
        for d in &self.search_dirs {
            let origin = serde_json::to_value(d.origin).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
            let missing = if d.exists { "" } else { " (missing)" };
            writeln!(f, "  {} [{origin}]{missing}", d.dir.display())?;
        }
        Ok(())
    }
}

/// Bytes in GiB, for messages.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}
