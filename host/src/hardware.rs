//! What the host can tell about the hardware without loading any backend: CPU features
//! (checked before a plugin's code runs, since code built for a missing feature dies with
//! SIGILL) and what the NVIDIA driver offers. `cuInit` is the driver's own code: it is run
//! in a crash-isolated child whenever the caller isolates probes, never for a cache key, and
//! a driver once initialised in a process is never unloaded from it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::probe::Isolation;

/// CPU features to treat as missing: `LLAMA_DISABLE_CPU_FEATURES=avx512f,avx2`. For testing
/// the variant choice on any machine, or forcing a lower CPU variant.
pub fn disabled_cpu_features() -> Vec<String> {
    std::env::var("LLAMA_DISABLE_CPU_FEATURES")
        .unwrap_or_default()
        .split([',', ' '])
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect()
}

/// Whether this CPU has `feature` (named as in Rust's `target_feature`). `None` when the
/// name is unknown to this host: such a plugin is refused, never run blind.
pub fn cpu_has(feature: &str) -> Option<bool> {
    let detected = cpu_detects(feature)?;
    Some(detected && !disabled_cpu_features().iter().any(|d| d == feature))
}

fn cpu_detects(feature: &str) -> Option<bool> {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        use std::arch::is_x86_feature_detected as has;
        Some(match feature {
            "ssse3" => has!("ssse3"),
            "sse4.1" => has!("sse4.1"),
            "sse4.2" => has!("sse4.2"),
            "popcnt" => has!("popcnt"),
            "bmi1" => has!("bmi1"),
            "lzcnt" => has!("lzcnt"),
            "movbe" => has!("movbe"),
            "avx" => has!("avx"),
            "avx2" => has!("avx2"),
            "fma" => has!("fma"),
            "f16c" => has!("f16c"),
            "bmi2" => has!("bmi2"),
            "avx512f" => has!("avx512f"),
            "avx512bw" => has!("avx512bw"),
            "avx512vl" => has!("avx512vl"),
            "avx512dq" => has!("avx512dq"),
            "avx512cd" => has!("avx512cd"),
            "avx512vnni" => has!("avx512vnni"),
            "avx512vbmi" => has!("avx512vbmi"),
            "avx512bf16" => has!("avx512bf16"),
            "avxvnni" => has!("avxvnni"),
            _ => return None,
        })
    }
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::is_aarch64_feature_detected as has;
        Some(match feature {
            "neon" => has!("neon"),
            "dotprod" => has!("dotprod"),
            "i8mm" => has!("i8mm"),
            "sve" => has!("sve"),
            _ => return None,
        })
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = feature;
        None
    }
}

/// The required features this CPU lacks (unknown names count as missing).
pub fn missing_cpu_features<'a>(required: impl IntoIterator<Item = &'a str>, has: impl Fn(&str) -> Option<bool>) -> Vec<String> {
    required.into_iter().filter(|f| has(f) != Some(true)).map(str::to_string).collect()
}

/// The oldest driver API version a CUDA plugin of this project works with: it is built with
/// the CUDA 13.0 toolkit (scripts/build-cuda), and a driver reports 13000 for CUDA 13.0.
pub const MIN_CUDA_DRIVER: i32 = 13000;

/// One CUDA device as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CudaDevice {
    pub name: String,
    pub total_memory: u64,
}

/// What the NVIDIA driver says, read without any CUDA plugin.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CudaDriver {
    /// `cuDriverGetVersion`: 1000 × major + 10 × minor (13000 is CUDA 13.0).
    pub version: i32,
    pub devices: Vec<CudaDevice>,
}

/// `13000` → `13.0`.
pub fn cuda_version_string(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// The NVIDIA driver library, by the name the CUDA runtime loads it.
const CUDA_DRIVER_LIB: &str = if cfg!(windows) { "nvcuda.dll" } else { "libcuda.so.1" };

/// Opens the NVIDIA driver library (`lib`, normally `libcuda.so.1`) through libloading and
/// asks it: `cuInit`, `cuDriverGetVersion`, `cuDeviceGetCount`, and each device's name and
/// memory. Every failure is a sentence for the selection report.
///
/// Private: it runs whatever library `lib` names, initialisers and all, in this process.
/// The library is never unloaded.
fn query_cuda_driver(lib: &str) -> Result<CudaDriver, String> {
    type CuResult = i32;
    // SAFETY: opening the NVIDIA driver library runs its initialisers, which the driver
    // supports; a library of that name that is not the driver is caught by the symbol
    // lookups below failing. `lib` is this module's own constant outside its tests.
    let library = unsafe { libloading::Library::new(lib) }.map_err(|_| format!("{lib} not found (no NVIDIA driver)"))?;
    // Never dlclose'd: after cuInit the driver has threads and handlers in this process that
    // run its code, and unloading it would pull that code from under them.
    let library = std::mem::ManuallyDrop::new(library);
    macro_rules! sym {
        ($name:literal, $ty:ty) => {
            // SAFETY: the symbol is looked up with the signature the CUDA driver API documents
            // for it (cuda.h); the library is never unloaded, so it outlives every call.
            unsafe { library.get::<$ty>($name) }.map_err(|_| format!("{lib} has no {} (not an NVIDIA driver?)", String::from_utf8_lossy(&$name[..$name.len() - 1])))?
        };
    }
    let cu_init = sym!(b"cuInit\0", unsafe extern "C" fn(u32) -> CuResult);
    let cu_driver_get_version = sym!(b"cuDriverGetVersion\0", unsafe extern "C" fn(*mut i32) -> CuResult);
    let cu_device_get_count = sym!(b"cuDeviceGetCount\0", unsafe extern "C" fn(*mut i32) -> CuResult);
    let cu_device_get = sym!(b"cuDeviceGet\0", unsafe extern "C" fn(*mut i32, i32) -> CuResult);
    let cu_device_get_name = sym!(b"cuDeviceGetName\0", unsafe extern "C" fn(*mut std::ffi::c_char, i32, i32) -> CuResult);
    let cu_device_total_mem = sym!(b"cuDeviceTotalMem_v2\0", unsafe extern "C" fn(*mut usize, i32) -> CuResult);
    let mut version = 0;
    // SAFETY: cuDriverGetVersion writes one int through a valid pointer; it needs no cuInit.
    let r = unsafe { cu_driver_get_version(&mut version) };
    if r != 0 {
        return Err(format!("the NVIDIA driver did not report its version (CUDA error {r})"));
    }
    // SAFETY: cuInit takes flags 0 and has no other preconditions.
    let r = unsafe { cu_init(0) };
    if r != 0 {
        // 100: no device; 999 and others: a broken or mismatched driver installation.
        return Err(match r {
            100 => format!("NVIDIA driver {} found, but no CUDA device", cuda_version_string(version)),
            _ => format!("NVIDIA driver {} found, but cuInit failed (CUDA error {r})", cuda_version_string(version)),
        });
    }
    let mut count = 0;
    // SAFETY: writes one int through a valid pointer, after a successful cuInit.
    let r = unsafe { cu_device_get_count(&mut count) };
    if r != 0 {
        return Err(format!("cuDeviceGetCount failed (CUDA error {r})"));
    }
    let mut devices = Vec::new();
    for i in 0..count.clamp(0, 64) {
        let mut dev = 0;
        let mut name = [0 as std::ffi::c_char; 256];
        let mut total = 0usize;
        // SAFETY: valid out-pointers; `name` holds 256 bytes and the length passed is 255, so
        // the driver's NUL-terminated string always fits.
        let ok = unsafe { cu_device_get(&mut dev, i) == 0 && cu_device_get_name(name.as_mut_ptr(), 255, dev) == 0 && cu_device_total_mem(&mut total, dev) == 0 };
        if !ok {
            continue;
        }
        // SAFETY: the driver wrote a NUL-terminated string into `name` (zero-initialised, so a
        // terminator exists even if it wrote nothing).
        let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
        devices.push(CudaDevice { name, total_memory: total as u64 });
    }
    Ok(CudaDriver { version, devices })
}

/// The child side of an isolated driver query (`llama __probe-backend --cuda-driver`): what
/// the driver says, before the version and device rules.
pub(crate) fn query_cuda_driver_here() -> Result<CudaDriver, String> {
    query_cuda_driver(CUDA_DRIVER_LIB)
}

static DRIVER: OnceLock<Result<CudaDriver, String>> = OnceLock::new();

/// Whether CUDA can work here, before any CUDA plugin is loaded: a driver, new enough for
/// this project's CUDA build, with at least one device. The reason when not.
///
/// Asked once per process: in a child through `isolation` (the probe child mode: a driver
/// that crashes or hangs in cuInit takes only the child down), in this process only when
/// there is none. Not asked at all where no driver library exists for the loader to find.
pub fn cuda_driver_via(isolation: Option<&Isolation>) -> Result<CudaDriver, String> {
    DRIVER.get_or_init(|| cuda_usable(ask_cuda_driver(isolation))).clone()
}

/// The answer an earlier [`cuda_driver_via`] got (discovery asks first, isolated when its
/// options say so), or else the driver asked in this process.
pub fn cuda_driver() -> Result<CudaDriver, String> {
    cuda_driver_via(None)
}

fn ask_cuda_driver(isolation: Option<&Isolation>) -> Result<CudaDriver, String> {
    let files = cuda_driver_files();
    if files.complete && files.found.is_empty() {
        return Err(format!("{CUDA_DRIVER_LIB} not found (no NVIDIA driver)"));
    }
    match isolation {
        Some(iso) => crate::probe::cuda_driver_in_child(iso),
        None => query_cuda_driver(CUDA_DRIVER_LIB),
    }
}

/// The `libcuda.so.1` files the dynamic loader could pick.
struct DriverFiles {
    found: Vec<PathBuf>,
    /// Whether every place the loader looks was searched (glibc Linux, with an ld.so.cache);
    /// elsewhere an empty list proves nothing and the driver is asked.
    complete: bool,
}

/// Looks where glibc's loader looks for `libcuda.so.1`, without loading anything:
/// `LD_LIBRARY_PATH`, `/etc/ld.so.cache`, then the default directories.
fn cuda_driver_files() -> DriverFiles {
    let mut found: Vec<PathBuf> = Vec::new();
    let mut add = |p: PathBuf| {
        if p.is_file() && !found.contains(&p) {
            found.push(p);
        }
    };
    // An empty entry is the current directory, as for the loader (`"".join(x)` is `x`).
    for dir in std::env::var_os("LD_LIBRARY_PATH").iter().flat_map(std::env::split_paths) {
        add(dir.join(CUDA_DRIVER_LIB));
    }
    let cache = if cfg!(target_os = "linux") { std::fs::read("/etc/ld.so.cache").ok() } else { None };
    for p in cache.as_deref().map(|c| paths_in_ld_cache(c, CUDA_DRIVER_LIB)).unwrap_or_default() {
        add(p);
    }
    for dir in ["/lib64", "/usr/lib64", "/lib", "/usr/lib"] {
        add(Path::new(dir).join(CUDA_DRIVER_LIB));
    }
    DriverFiles { found, complete: cache.is_some() }
}

/// The full paths ld.so.cache holds for `name`: NUL-terminated strings ending in `/name`
/// (the cache's string table, in both of glibc's formats).
fn paths_in_ld_cache(cache: &[u8], name: &str) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let needle = format!("/{name}\0").into_bytes();
    let mut paths = Vec::new();
    let mut from = 0;
    while let Some(at) = cache[from..].windows(needle.len()).position(|w| w == needle).map(|i| from + i) {
        let start = cache[..at].iter().rposition(|&b| b == 0).map_or(0, |i| i + 1);
        let path = Path::new(std::ffi::OsStr::from_bytes(&cache[start..at + needle.len() - 1]));
        if path.is_absolute() {
            paths.push(path.to_path_buf());
        }
        from = at + needle.len();
    }
    paths
}

/// Cheap facts that change when the NVIDIA driver is installed, upgraded or removed, for
/// the probe cache's key: the identity of each `libcuda.so.1` the loader could pick and the
/// kernel module's version line. Nothing is loaded and cuInit is not called.
pub fn cuda_driver_fingerprint() -> String {
    let files: Vec<String> = cuda_driver_files()
        .found
        .iter()
        .map(|f| format!("{}@{}", f.display(), crate::probe::file_identity(f).unwrap_or_default()))
        .collect();
    let module = std::fs::read_to_string("/proc/driver/nvidia/version").ok();
    let module = module.as_deref().and_then(|v| v.lines().next()).map_or("none", str::trim);
    format!("[{}] module [{module}]", files.join(","))
}

/// Applies the version and device-count rules to what the driver said.
pub fn cuda_usable(d: Result<CudaDriver, String>) -> Result<CudaDriver, String> {
    let d = d?;
    if d.version < MIN_CUDA_DRIVER {
        return Err(format!(
            "NVIDIA driver supports CUDA {}, too old for this CUDA build (needs {}); update the driver",
            cuda_version_string(d.version),
            cuda_version_string(MIN_CUDA_DRIVER)
        ));
    }
    if d.devices.is_empty() {
        return Err(format!("NVIDIA driver {} found, but no CUDA device", cuda_version_string(d.version)));
    }
    Ok(d)
}

/// Whether Metal can exist on this platform.
pub fn metal_platform() -> Result<(), String> {
    metal_platform_for(std::env::consts::OS)
}

/// The platform rule for Metal, on an OS name as `std::env::consts::OS` gives it. Whether
/// the Mac has a usable GPU is the Metal plugin's own probe (ggml's device list).
pub fn metal_platform_for(os: &str) -> Result<(), String> {
    match os {
        "macos" => Ok(()),
        "ios" => Err("Metal plugins are built for macOS; iOS apps link llama.cpp directly".into()),
        other => Err(format!("Metal needs macOS (this is {other})")),
    }
}

/// The host-side reason an accelerator cannot be used here, before any plugin is loaded
/// (the NVIDIA driver asked through `isolation`, see [`cuda_driver_via`]).
pub fn accelerator_unavailable(acc: crate::types::Accelerator, isolation: Option<&Isolation>) -> Option<String> {
    use crate::types::Accelerator;
    match acc {
        Accelerator::Cpu => None,
        Accelerator::Cuda => cuda_driver_via(isolation).err(),
        Accelerator::Metal => metal_platform().err(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(have: &'static [&'static str]) -> impl Fn(&str) -> Option<bool> {
        move |f| match f {
            "avx2" | "fma" | "avx512f" | "f16c" => Some(have.contains(&f)),
            _ => None,
        }
    }

    #[test]
    fn cuda_rules_old_drivers_and_no_devices() {
        let dev = CudaDevice { name: "H100".into(), total_memory: 80 << 30 };
        let ok = cuda_usable(Ok(CudaDriver { version: 13000, devices: vec![dev.clone()] }));
        assert_eq!(ok.unwrap().devices, vec![dev.clone()]);
        let old = cuda_usable(Ok(CudaDriver { version: 12040, devices: vec![dev] })).unwrap_err();
        assert_eq!(old, "NVIDIA driver supports CUDA 12.4, too old for this CUDA build (needs 13.0); update the driver");
        let none = cuda_usable(Ok(CudaDriver { version: 13010, devices: vec![] })).unwrap_err();
        assert!(none.contains("no CUDA device"), "{none}");
        assert!(query_cuda_driver("libcuda-does-not-exist.so.1").unwrap_err().contains("no NVIDIA driver"));
    }

    #[test]
    fn the_driver_is_found_in_ld_so_cache_strings() {
        // Keys and values are NUL-terminated strings; a path is a value ending in /name.
        let cache = b"glibc-ld.so.cache1.1\0\x01\x02libcuda.so.1\0/usr/lib/x86_64-linux-gnu/libcuda.so.1\0libcudart.so.12\0/opt/x/libcuda.so.10\0/usr/lib32/libcuda.so.1\0";
        assert_eq!(
            paths_in_ld_cache(cache, "libcuda.so.1"),
            vec![PathBuf::from("/usr/lib/x86_64-linux-gnu/libcuda.so.1"), PathBuf::from("/usr/lib32/libcuda.so.1")]
        );
        assert!(paths_in_ld_cache(b"libz.so.1\0/usr/lib/libz.so.1\0", "libcuda.so.1").is_empty());
    }

    #[test]
    fn metal_needs_macos() {
        assert_eq!(metal_platform_for("macos"), Ok(()));
        assert_eq!(metal_platform_for("linux").unwrap_err(), "Metal needs macOS (this is linux)");
        assert!(metal_platform_for("windows").unwrap_err().contains("windows"));
        assert_eq!(metal_platform().is_ok(), cfg!(target_os = "macos"));
    }

    #[test]
    fn missing_features_are_listed_in_order() {
        let has = fake(&["avx2", "fma"]);
        assert_eq!(missing_cpu_features(["avx2", "avx512f", "fma", "f16c"], &has), vec!["avx512f", "f16c"]);
        assert!(missing_cpu_features(["avx2", "fma"], &has).is_empty());
    }

    #[test]
    fn unknown_features_count_as_missing() {
        assert_eq!(missing_cpu_features(["amx-tile"], fake(&[])), vec!["amx-tile"]);
    }

    #[test]
    fn this_cpu_reports_known_features() {
        #[cfg(target_arch = "x86_64")]
        assert!(cpu_has("sse4.2").is_some());
        assert_eq!(cpu_has("no-such-feature"), None);
    }
}
