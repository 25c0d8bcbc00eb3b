//! The only code that touches llama-cpp-sys-2: safe owners for llama.cpp's handles and the
//! implementation of the plugin-api traits, shared by every backend crate (cpu, cuda, metal).
//! Every function reachable from the host catches panics: nothing unwinds across the ABI.

mod context;
mod embed;
mod guard;
mod log;
mod model;
mod rpc;
mod sampler;
mod trigger;

use std::sync::Once;

use llama_plugin_api::abi_stable::sabi_trait::TD_Opaque;
use llama_plugin_api::abi_stable::std_types::{RResult, RSlice, RStr, RString};
use llama_plugin_api::{Accelerator, BackendBox, BackendError, BackendInfo, Backend_TO, LogSink, RemoteServer, RpcServeParams};

pub use guard::{guard, guard_probe};

/// A parameter this backend refuses, by name: every module reports them the same way.
pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> BackendError {
    BackendError::invalid_param(field, reason)
}

/// Which llama.cpp this backend links: the binding crate's version pins the llama.cpp tree.
pub const LLAMA_BUILD: &str = "llama-cpp-sys-2 0.1.161";

/// The CPU features this library was compiled to use, comma-separated, in the names the
/// host checks: those the C compiler enabled for llama.cpp and those the Rust code was
/// compiled for (recorded by build.rs). A CPU lacking one of them would hit an illegal
/// instruction.
pub const CPU_FEATURES: &str = env!("LLAMA_CPU_FEATURES");

/// [`CPU_FEATURES`] as the root module carries them.
pub fn compiled_cpu_features() -> RSlice<'static, RStr<'static>> {
    // Leaked once per process: the root module is built once and lives as long as the library.
    RSlice::from_slice(Box::leak(feature_list().into_boxed_slice()))
}

/// How many CPU features this library was compiled to use (a CPU plugin's score).
pub fn compiled_cpu_feature_count() -> usize {
    feature_list().len()
}

fn feature_list() -> Vec<RStr<'static>> {
    CPU_FEATURES.split(',').filter(|f| !f.is_empty()).map(RStr::from_str).collect()
}

/// The bytes of the ELF note section `.llama_cpu_features` (see `declare_backend!`):
/// `llama-cpu-features:v1:` then [`CPU_FEATURES`]. Built at compile time.
#[doc(hidden)]
pub const fn cpu_features_note<const N: usize>() -> [u8; N] {
    let prefix = CPU_FEATURES_NOTE_PREFIX.as_bytes();
    let list = CPU_FEATURES.as_bytes();
    let mut out = [0u8; N];
    let mut i = 0;
    while i < prefix.len() {
        out[i] = prefix[i];
        i += 1;
    }
    let mut j = 0;
    while j < list.len() {
        out[i + j] = list[j];
        j += 1;
    }
    out
}

#[doc(hidden)]
pub const CPU_FEATURES_NOTE_PREFIX: &str = "llama-cpu-features:v1:";
#[doc(hidden)]
pub const CPU_FEATURES_NOTE_LEN: usize = CPU_FEATURES_NOTE_PREFIX.len() + CPU_FEATURES.len();

/// The backend object handed to the host by `init`.
struct LlamaBackend {
    info: BackendInfo,
}

impl llama_plugin_api::Backend for LlamaBackend {
    fn info(&self) -> BackendInfo {
        self.info.clone()
    }

    fn load_model(
        &self,
        path: RStr<'_>,
        params: llama_plugin_api::ModelParams,
    ) -> RResult<llama_plugin_api::ModelBox, BackendError> {
        guard(|| model::load(path.as_str(), &params))
    }

    fn rpc_server_info(&self, endpoint: RStr<'_>, timeout_ms: u32) -> RResult<RemoteServer, BackendError> {
        guard(|| rpc::probe(endpoint.as_str(), rpc::timeout(timeout_ms), 0))
    }

    fn rpc_serve(&self, params: RpcServeParams) -> RResult<(), BackendError> {
        guard(|| serve_rpc(&params))
    }
}

extern "C" {
    // ggml-rpc.h (no bindings are generated for it): serves `devices` until the process
    // ends; returns only when it cannot start or accept.
    fn ggml_backend_rpc_start_server(
        endpoint: *const std::ffi::c_char,
        cache_dir: *const std::ffi::c_char,
        n_threads: usize,
        n_devices: usize,
        devices: *mut llama_cpp_sys_2::ggml_backend_dev_t,
    );
}

/// `llama rpc-server`: this backend's GPUs (the CPU when it has none) behind ggml's RPC
/// server on `params.endpoint`.
fn serve_rpc(params: &RpcServeParams) -> Result<(), BackendError> {
    let endpoint = params.endpoint.as_str();
    rpc::check_bind(endpoint)?;
    let mut devices: Vec<_> = registered_devices(&DEVICE_GPU).into_iter().map(|(d, _)| d).collect();
    if devices.is_empty() {
        devices = registered_devices(&[DEVICE_CPU]).into_iter().map(|(d, _)| d).collect();
    }
    if devices.is_empty() {
        return Err(BackendError::Unavailable { reason: "ggml registered no device to serve".into() });
    }
    let c_endpoint = std::ffi::CString::new(endpoint).map_err(|_| invalid("host", "contains a NUL byte"))?;
    let cache = match &params.cache_dir {
        llama_plugin_api::abi_stable::std_types::ROption::RSome(dir) => Some(std::ffi::CString::new(dir.as_str()).map_err(|_| invalid("cache", "contains a NUL byte"))?),
        llama_plugin_api::abi_stable::std_types::ROption::RNone => None,
    };
    // SAFETY: the strings are NUL-terminated and outlive the call (which runs for the rest
    // of the process); `devices` holds live registry devices, and ggml reads `n_devices`.
    unsafe {
        ggml_backend_rpc_start_server(
            c_endpoint.as_ptr(),
            cache.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            params.n_threads.max(1) as usize,
            devices.len(),
            devices.as_mut_ptr(),
        )
    };
    Err(BackendError::Unavailable { reason: format!("the RPC server on {endpoint} stopped (its output above says why)").into() })
}

/// Builds the static description of a backend.
pub fn backend_info(name: &str, accelerator: Accelerator) -> BackendInfo {
    BackendInfo {
        name: RString::from(name),
        accelerator,
        version: RString::from(env!("CARGO_PKG_VERSION")),
        llama_build: RString::from(LLAMA_BUILD),
    }
}

/// Initialises llama.cpp once per library and routes its log into `sink`.
pub fn init(sink: LogSink, info: BackendInfo) -> RResult<BackendBox, BackendError> {
    guard(|| {
        log::install(sink);
        static INIT: Once = Once::new();
        INIT.call_once(|| {
            // SAFETY: llama_backend_init has no preconditions; `Once` makes it run once.
            unsafe { llama_cpp_sys_2::llama_backend_init() };
        });
        Ok(Backend_TO::from_value(LlamaBackend { info }, TD_Opaque))
    })
}

/// One line describing the CPU as llama.cpp sees it (`AVX2 = 1 | ...`, only the set flags).
pub fn system_info() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated string owned by llama.cpp.
    let raw = unsafe { std::ffi::CStr::from_ptr(llama_cpp_sys_2::llama_print_system_info()) };
    raw.to_string_lossy()
        .replace("CPU :", "")
        .split('|')
        .map(str::trim)
        .filter(|kv| kv.ends_with("= 1"))
        .map(|kv| kv.trim_end_matches("= 1").trim())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The compute devices ggml registered in this build, of the given device types.
pub fn devices(types: &[u32]) -> llama_plugin_api::abi_stable::std_types::RVec<llama_plugin_api::DeviceInfo> {
    use llama_cpp_sys_2 as sys;
    registered_devices(types)
        .into_iter()
        .map(|(dev, name)| {
            let (mut free, mut total) = (0usize, 0usize);
            // SAFETY: `dev` comes from the registry, which lives as long as the library; the
            // out-pointers are valid.
            unsafe { sys::ggml_backend_dev_memory(dev, &mut free, &mut total) };
            // SAFETY: as above.
            let description = ggml_text(unsafe { sys::ggml_backend_dev_description(dev) });
            llama_plugin_api::DeviceInfo { name: RString::from(name), description: RString::from(description), memory_total: total as u64, memory_free: free as u64 }
        })
        .collect()
}

/// The devices ggml registered in this build, of the given types, in registry order (the
/// order llama.cpp uses), with their names. Shared by the probe's device list and the
/// resolution of `--device` names at load.
pub(crate) fn registered_devices(types: &[u32]) -> Vec<(llama_cpp_sys_2::ggml_backend_dev_t, String)> {
    use llama_cpp_sys_2 as sys;
    let mut out = Vec::new();
    // SAFETY: the device registry is initialised on first use and never freed; the
    // indices come from ggml_backend_dev_count.
    unsafe {
        for i in 0..sys::ggml_backend_dev_count() {
            let dev = sys::ggml_backend_dev_get(i);
            if dev.is_null() || !types.contains(&sys::ggml_backend_dev_type(dev)) {
                continue;
            }
            out.push((dev, ggml_text(sys::ggml_backend_dev_name(dev))));
        }
    }
    out
}

/// A string ggml owns (device names and descriptions), or "" for NULL.
pub(crate) fn ggml_text(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: ggml returns NUL-terminated strings owned by the device registry, which
        // lives as long as the library.
        unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// ggml's device type for CPUs, for [`devices`].
pub const DEVICE_CPU: u32 = llama_cpp_sys_2::GGML_BACKEND_DEVICE_TYPE_CPU;
/// ggml's device types for GPUs, for [`devices`].
pub const DEVICE_GPU: [u32; 2] = [llama_cpp_sys_2::GGML_BACKEND_DEVICE_TYPE_GPU, llama_cpp_sys_2::GGML_BACKEND_DEVICE_TYPE_IGPU];

/// The probe of a GPU backend: usable with `score` when ggml's registry holds a GPU of this
/// build's kind (`label` names it in the reason), unusable otherwise.
pub fn probe_gpu(label: &str, score: u32) -> llama_plugin_api::ProbeReport {
    gpu_report(label, score, devices(&DEVICE_GPU))
}

/// The verdict of a GPU probe on the devices ggml found (the testable half of [`probe_gpu`]).
pub fn gpu_report(
    label: &str,
    score: u32,
    devices: llama_plugin_api::abi_stable::std_types::RVec<llama_plugin_api::DeviceInfo>,
) -> llama_plugin_api::ProbeReport {
    let (usable, reason) = if devices.is_empty() {
        (false, format!("no {label} device found by ggml"))
    } else {
        (true, format!("{} {label} device(s)", devices.len()))
    };
    llama_plugin_api::ProbeReport { usable, score: if usable { score } else { 0 }, reason: RString::from(reason), devices }
}

/// Declares a backend plugin: the `extern "C"` functions of the root module and the
/// exported root module itself. A backend crate is this one line plus its Cargo features:
///
/// ```text
/// llama_backend_core::declare_backend!("cuda", Accelerator::Cuda, || llama_backend_core::probe_gpu("CUDA", 100));
/// ```
///
/// The crate must depend on `abi_stable` directly (its export macro names the crate).
#[macro_export]
macro_rules! declare_backend {
    ($name:literal, $accelerator:expr, $probe:expr) => {
        extern "C" fn info() -> $crate::__api::BackendInfo {
            $crate::backend_info($name, $accelerator)
        }

        extern "C" fn probe() -> $crate::__api::ProbeReport {
            $crate::guard_probe($probe)
        }

        extern "C" fn init(
            sink: $crate::__api::LogSink,
        ) -> $crate::__api::abi_stable::std_types::RResult<$crate::__api::BackendBox, $crate::__api::BackendError> {
            $crate::init(sink, info())
        }

        /// The CPU features this library needs, in an ELF section of its own: the host reads
        /// it from the file before opening the library, because opening it runs llama.cpp's
        /// static initialisers, compiled for those features (SIGILL on a CPU without them).
        #[cfg(target_os = "linux")]
        #[used]
        #[link_section = ".llama_cpu_features"]
        static LLAMA_CPU_FEATURES_NOTE: [u8; $crate::CPU_FEATURES_NOTE_LEN] = $crate::cpu_features_note::<{ $crate::CPU_FEATURES_NOTE_LEN }>();

        /// The plugin's root module, checked by the host before any other call.
        #[$crate::__api::abi_stable::export_root_module]
        pub fn get_library() -> $crate::__api::BackendModRef {
            use $crate::__api::abi_stable::prefix_type::PrefixTypeTrait;
            $crate::__api::BackendMod { required_cpu_features: $crate::compiled_cpu_features(), info, probe, init }
                .leak_into_prefix()
        }
    };
}

#[doc(hidden)]
pub use llama_plugin_api as __api;

#[cfg(test)]
mod tests {
    use llama_cpp_sys_2 as sys;
    use llama_plugin_api::abi_stable::std_types::{RString, RVec};
    use llama_plugin_api::DeviceInfo;

    /// The GPU plugins' probe (Metal's included, which cannot run on Linux) against device
    /// lists standing in for ggml's registry.
    #[test]
    fn a_gpu_probe_is_usable_only_with_a_device() {
        let none = super::gpu_report("Metal", 90, RVec::new());
        assert!(!none.usable);
        assert_eq!((none.score, none.reason.as_str()), (0, "no Metal device found by ggml"));
        let m2 = DeviceInfo {
            name: RString::from("MTL0"),
            description: RString::from("Apple M2 Pro"),
            memory_total: 32 << 30,
            memory_free: 21 << 30,
        };
        let one = super::gpu_report("Metal", 90, vec![m2.clone()].into());
        assert!(one.usable);
        assert_eq!((one.score, one.reason.as_str()), (90, "1 Metal device(s)"));
        assert_eq!(one.devices[0].description.as_str(), "Apple M2 Pro");
        let two = super::gpu_report("CUDA", 100, vec![m2.clone(), m2].into());
        assert_eq!(two.reason.as_str(), "2 CUDA device(s)");
    }

    /// This build (the CPU one) registers no GPU: its GPU probe says so.
    #[test]
    fn the_cpu_build_has_no_gpu_device() {
        assert!(!super::probe_gpu("CUDA", 100).usable);
        assert!(!super::devices(&[super::DEVICE_CPU]).is_empty());
    }

    /// The validator refuses what this ggml cannot load and sizes tensors as ggml does:
    /// its type table must match ggml's, type by type.
    #[test]
    fn the_validators_tensor_types_match_ggml() {
        for t in 0..sys::GGML_TYPE_COUNT {
            // SAFETY: plain lookups in ggml's static type table, for every id below the count.
            let (block, size) = unsafe { (sys::ggml_blck_size(t as _), sys::ggml_type_size(t as _)) };
            let ours = llama_gguf::GGML_TYPES.iter().find(|e| e.0 == t);
            if size == 0 {
                assert!(ours.is_none(), "type {t} was removed from ggml but the validator accepts it");
            } else {
                let (_, name, b, s) = ours.unwrap_or_else(|| panic!("type {t} is missing from the validator's table"));
                assert_eq!((*b, *s), (block as u64, size as u64), "type {t} ({name})");
            }
        }
    }
}
