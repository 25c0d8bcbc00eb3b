//! Backend discovery, selection and fallback through the real binary and plugin.

use std::path::Path;

use llama_tests::{assert_exit, built_library, llama, model_path, stderr, stdout};

fn report_json(extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["backends", "--json"];
    args.extend_from_slice(extra);
    let o = llama(&args);
    assert_exit(&o, 0);
    serde_json::from_str(&stdout(&o)).expect("backends --json is JSON")
}

fn candidate<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no candidate {name} in {report:#}"))
}

#[test]
fn cpu_is_selected_and_gpus_are_listed_with_reasons() {
    let r = report_json(&[]);
    let cpu = candidate(&r, "cpu");
    assert_eq!(cpu["verdict"], "selected");
    assert!(cpu["path"].as_str().unwrap().ends_with(&format!("llama_backend_cpu.{}", std::env::consts::DLL_EXTENSION)));
    for gpu in ["cuda", "metal"] {
        let c = candidate(&r, gpu);
        assert_ne!(c["verdict"], "selected");
        assert!(!c["reason"].as_str().unwrap().is_empty(), "{gpu} has no reason");
    }
    if cfg!(target_os = "linux") {
        assert!(candidate(&r, "metal")["reason"].as_str().unwrap().contains("macOS"));
    }

    let o = llama(&["backends"]);
    assert_exit(&o, 0);
    let text = stdout(&o);
    for line in ["cpu      selected", "cuda", "metal"] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}

/// A backends directory holding (a) a file that is not a shared library, (b) a shared
/// library that is not a llama backend, (c) a backend built for another plugin ABI.
fn broken_backends_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ext = std::env::consts::DLL_EXTENSION;
    std::fs::write(dir.path().join(format!("garbage.{ext}")), b"this is a text file, not a library\n").unwrap();
    std::fs::copy(built_library("fixture_not_a_backend"), dir.path().join(format!("libnot_a_backend.{ext}"))).unwrap();
    std::fs::copy(built_library("fixture_future_abi_backend"), dir.path().join(format!("libllama_backend_future.{ext}"))).unwrap();
    dir
}

fn dir_arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn broken_candidates_are_rejected_with_reasons_and_cpu_still_runs() {
    let dir = broken_backends_dir();
    let ext = std::env::consts::DLL_EXTENSION;
    let r = report_json(&["--backend-dir", dir_arg(dir.path())]);
    let expect = [
        (format!("garbage.{ext}"), "not-a-library", "not a shared library"),
        (format!("libnot_a_backend.{ext}"), "not-a-backend", "not a llama backend"),
        (format!("libllama_backend_future.{ext}"), "abi-version", "built for plugin ABI 9.0.0, host expects 7.0.0"),
    ];
    for (file, kind, reason) in &expect {
        let c = candidate(&r, file);
        assert_eq!(c["verdict"], "rejected", "{file}");
        assert_eq!(c["rejection"], *kind, "{file}");
        assert!(c["reason"].as_str().unwrap().contains(reason), "{file}: {}", c["reason"]);
        assert!(c["path"].as_str().unwrap().starts_with(dir_arg(dir.path())));
    }
    assert_eq!(candidate(&r, "cpu")["verdict"], "selected");

    // The same directory through `llama run -v`: generation works on CPU and the report
    // printed on stderr names each rejected file.
    let model = model_path();
    let o = llama(&["run", "-v", "--backend-dir", dir_arg(dir.path()), "-m", model.to_str().unwrap(), "-p", "Hello", "-n", "4", "--temp", "0"]);
    assert_exit(&o, 0);
    assert!(!stdout(&o).trim().is_empty(), "no text generated");
    let err = stderr(&o);
    for (file, _, reason) in &expect {
        assert!(err.contains(file.as_str()) && err.contains(reason), "stderr lacks {file}: {reason}\n{err}");
    }
    assert!(err.contains("backend cpu"));
}

#[test]
fn backend_path_env_is_searched() {
    let dir = broken_backends_dir();
    let o = llama_tests::llama_cmd(&["backends", "--json"]).env("LLAMA_BACKEND_PATH", dir.path()).output().unwrap();
    assert_exit(&o, 0);
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let origins: Vec<&str> = r["search_dirs"].as_array().unwrap().iter().map(|d| d["origin"].as_str().unwrap()).collect();
    assert_eq!(origins.first(), Some(&"env"));
    assert_eq!(candidate(&r, &format!("garbage.{}", std::env::consts::DLL_EXTENSION))["verdict"], "rejected");
}

#[test]
fn a_named_backend_that_cannot_run_is_an_error_not_a_fallback() {
    let model = model_path();
    let o = llama(&["run", "--backend", "cuda", "-m", model.to_str().unwrap(), "-p", "Hello", "-n", "4"]);
    assert_exit(&o, 4);
    let err = stderr(&o);
    assert!(err.contains("backend 'cuda' cannot be used here"), "{err}");
    assert!(stdout(&o).is_empty(), "generated text despite the error");

    let o = llama(&["run", "--backend", "tpu", "-m", model.to_str().unwrap(), "-p", "Hello"]);
    assert_exit(&o, 4);
    assert!(stderr(&o).contains("unknown backend 'tpu'"));
}

#[test]
fn explicit_cpu_backend_runs() {
    let model = model_path();
    let o = llama(&["run", "--backend", "cpu", "-m", model.to_str().unwrap(), "-p", "Hello", "-n", "2", "--temp", "0"]);
    assert_exit(&o, 0);
}

#[test]
fn install_checks_the_library_first() {
    let dest = tempfile::tempdir().unwrap();
    let d = dir_arg(dest.path());
    let cpu = built_library("llama_backend_cpu");
    let o = llama(&["backends", "install", cpu.to_str().unwrap(), "--dir", d]);
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("installed cpu backend"), "{}", stdout(&o));
    assert!(dest.path().join(cpu.file_name().unwrap()).is_file());

    let broken = broken_backends_dir();
    let ext = std::env::consts::DLL_EXTENSION;
    for (file, reason) in [
        (format!("garbage.{ext}"), "not a shared library"),
        (format!("libnot_a_backend.{ext}"), "not a llama backend"),
        (format!("libllama_backend_future.{ext}"), "built for plugin ABI 9.0.0, host expects 7.0.0"),
    ] {
        let o = llama(&["backends", "install", broken.path().join(&file).to_str().unwrap(), "--dir", d]);
        assert_exit(&o, 4);
        assert!(stderr(&o).contains(reason), "{file}: {}", stderr(&o));
        assert!(!dest.path().join(&file).exists(), "{file} was installed despite being refused");
    }
}

#[test]
fn an_installed_backend_is_picked_up_from_the_user_directory() {
    let data = tempfile::tempdir().unwrap();
    let cpu = built_library("llama_backend_cpu");
    let user_dir = data.path().join("llama/backends");
    let o = llama_tests::llama_cmd(&["backends", "install", cpu.to_str().unwrap()]).env("XDG_DATA_HOME", data.path()).output().unwrap();
    assert_exit(&o, 0);
    assert!(user_dir.join(cpu.file_name().unwrap()).is_file());
    let o = llama_tests::llama_cmd(&["backends", "--json"]).env("XDG_DATA_HOME", data.path()).output().unwrap();
    assert_exit(&o, 0);
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let cpus: Vec<&serde_json::Value> = r["candidates"].as_array().unwrap().iter().filter(|c| c["name"] == "cpu").collect();
    assert_eq!(cpus.len(), 2, "the build's and the installed copy: {r:#}");
    assert!(cpus.iter().any(|c| c["path"].as_str().unwrap().starts_with(user_dir.to_str().unwrap())));
    assert_eq!(cpus.iter().filter(|c| c["verdict"] == "selected").count(), 1);
}

/// A backends directory of misbehaving plugins: one segfaults when opened (a constructor),
/// one segfaults in its probe, one hangs in its probe. Each claims a score no real CPU
/// backend has, so a host that trusted them would pick them.
fn crashing_backends_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ext = std::env::consts::DLL_EXTENSION;
    for f in ["crash_on_open", "crash_in_probe", "hang_in_probe"] {
        std::fs::copy(built_library(&format!("fixture_{f}")), dir.path().join(format!("libllama_backend_{f}.{ext}"))).unwrap();
    }
    dir
}

#[test]
fn plugins_that_crash_or_hang_are_reported_and_skipped() {
    let dir = crashing_backends_dir();
    let o = llama_tests::llama_cmd(&["run", "-v", "--backend-dir", dir_arg(dir.path()), "-m", model_path().to_str().unwrap(), "-p", "Hello", "-n", "4"])
        .env("LLAMA_PROBE_TIMEOUT", "3")
        .output()
        .unwrap();
    assert_exit(&o, 0);
    assert!(!stdout(&o).trim().is_empty(), "no text generated");
    let err = stderr(&o);
    for (file, reason) in [
        ("libllama_backend_crash_on_open", "probe crashed: signal 11 (SIGSEGV)"),
        ("libllama_backend_crash_in_probe", "probe crashed: signal 11 (SIGSEGV)"),
        ("libllama_backend_hang_in_probe", "probe timed out after 3 s"),
    ] {
        let line = err.lines().find(|l| l.contains(file)).unwrap_or_else(|| panic!("{file} not reported in:\n{err}"));
        assert!(line.contains("rejected") && line.contains(reason), "{file}: {line}");
    }
    assert!(err.contains("cpu") && err.contains("selected"), "{err}");

    // Installing one of them is refused with the reason, and the host survives it.
    for f in ["crash_on_open", "hang_in_probe"] {
        let target = tempfile::tempdir().unwrap();
        let file = dir.path().join(format!("libllama_backend_{f}.{}", std::env::consts::DLL_EXTENSION));
        let o = llama_tests::llama_cmd(&["backends", "install", file.to_str().unwrap(), "--dir", dir_arg(target.path())]).env("LLAMA_PROBE_TIMEOUT", "3").output().unwrap();
        assert_exit(&o, 4);
        assert!(stderr(&o).contains("probe"), "{}", stderr(&o));
        assert!(std::fs::read_dir(target.path()).unwrap().next().is_none(), "a refused plugin was installed");
    }
}

/// The probe cache of one test, so that what it reads back is its own.
fn cached_reasons(cache_home: &Path) -> Vec<String> {
    let file = cache_home.join("llama/probes.json");
    let cache: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))).expect("the probe cache is JSON");
    cache["entries"].as_object().expect("entries").values().filter_map(|o| o["reason"].as_str().map(str::to_string)).collect()
}

/// A crash is a fact about the file and is cached; a timeout may be a cold disk or a busy
/// machine once, and was cached for good: the plugin stayed refused. It is asked again.
#[test]
fn a_probe_that_timed_out_is_not_cached() {
    let dir = crashing_backends_dir();
    let cache = tempfile::tempdir().unwrap();
    for start in ["cold", "warm"] {
        let o = llama_tests::llama_cmd(&["backends", "--json", "--backend-dir", dir_arg(dir.path())])
            .env("LLAMA_PROBE_TIMEOUT", "3")
            .env("XDG_CACHE_HOME", cache.path())
            .output()
            .unwrap();
        assert_exit(&o, 0);
        let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(candidate(&r, "libllama_backend_hang_in_probe.so")["reason"], "probe timed out after 3 s", "{start}");
        assert_eq!(candidate(&r, "libllama_backend_crash_on_open.so")["reason"], "probe crashed: signal 11 (SIGSEGV)", "{start}");
        assert_eq!(candidate(&r, "cpu")["verdict"], "selected", "{start}");
        let reasons = cached_reasons(cache.path());
        assert_eq!(reasons.iter().filter(|r| r.starts_with("probe crashed")).count(), 2, "{start}: {reasons:#?}");
        assert!(!reasons.iter().any(|r| r.contains("timed out")), "{start}: a timed-out probe was cached: {reasons:#?}");
    }
}

/// The probe cache must not trust a file because its path, size and modification time are
/// unchanged: a working plugin replaced in place by a crashing library padded to the same
/// size, its mtime restored (`touch -r`), was opened in the host on the cached verdict and
/// took it down with SIGSEGV. The change time cannot be set back, so the file is probed
/// again, in a child.
#[test]
fn a_plugin_replaced_with_the_same_size_and_mtime_is_probed_again() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let plugin = dir.path().join(format!("libllama_backend_swapped.{}", std::env::consts::DLL_EXTENSION));
    std::fs::copy(built_library("llama_backend_cpu"), &plugin).unwrap();
    let backends = |run: &str| {
        let o = llama_tests::llama_cmd(&["backends", "--json", "--backend-dir", dir_arg(dir.path())]).env("XDG_CACHE_HOME", cache.path()).output().unwrap();
        assert!(o.status.code() == Some(0), "{run} run: expected exit 0, got {:?}\n{}", o.status, stderr(&o));
        let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let row = r["candidates"].as_array().unwrap().iter().find(|c| c["path"] == plugin.to_str().unwrap()).cloned();
        (row.unwrap_or_else(|| panic!("no row for {} in {r:#}", plugin.display())), r)
    };
    // Found first (--backend-dir), the copy wins the tie with the build's CPU plugin: the
    // host opens this very file.
    let (row, _) = backends("first");
    assert_eq!(row["verdict"], "selected", "{row:#}");

    let before = std::fs::metadata(&plugin).unwrap();
    let mut crashing = std::fs::read(built_library("fixture_crash_on_open")).unwrap();
    assert!(crashing.len() as u64 <= before.len(), "the crashing fixture is larger than the CPU plugin");
    crashing.resize(before.len() as usize, 0);
    std::fs::write(&plugin, &crashing).unwrap();
    std::fs::File::options().write(true).open(&plugin).unwrap().set_modified(before.modified().unwrap()).unwrap();
    let after = std::fs::metadata(&plugin).unwrap();
    assert_eq!((after.len(), after.modified().unwrap()), (before.len(), before.modified().unwrap()), "the swap must keep size and mtime");

    let (row, r) = backends("after the swap");
    assert_eq!(row["verdict"], "rejected", "{row:#}");
    assert_eq!(row["rejection"], "probe-crashed", "{row:#}");
    assert_eq!(row["reason"], "probe crashed: signal 11 (SIGSEGV)", "{row:#}");
    assert_eq!(r["candidates"].as_array().unwrap().iter().filter(|c| c["verdict"] == "selected").count(), 1, "{r:#}");
}

/// The host asks the NVIDIA driver itself (cuInit, cuDriverGetVersion, cuDeviceGetCount)
/// before any CUDA plugin: here through a stand-in libcuda.so.1 on LD_LIBRARY_PATH.
#[test]
fn the_cuda_driver_is_queried_before_any_plugin() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(built_library("fixture_fake_cuda"), dir.path().join("libcuda.so.1")).unwrap();
    let report = |envs: &[(&str, &str)]| -> serde_json::Value {
        let mut cmd = llama_tests::llama_cmd(&["backends", "--json"]);
        cmd.env("LD_LIBRARY_PATH", dir.path());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let o = cmd.output().unwrap();
        assert_exit(&o, 0);
        serde_json::from_str(&stdout(&o)).unwrap()
    };
    let r = report(&[("FAKE_CUDA_DEVICES", "2")]);
    let cuda = candidate(&r, "cuda");
    assert_eq!(cuda["reason"], "NVIDIA driver 13.0 with 2 device(s); no cuda backend plugin found", "{cuda:#}");
    assert_eq!(cuda["devices"][1]["name"], "Fake GPU 1");
    assert_eq!(cuda["devices"][0]["memory_total"], 80u64 << 30);
    assert_eq!(candidate(&r, "cpu")["verdict"], "selected");

    let r = report(&[("FAKE_CUDA_VERSION", "12040")]);
    assert_eq!(
        candidate(&r, "cuda")["reason"],
        "NVIDIA driver supports CUDA 12.4, too old for this CUDA build (needs 13.0); update the driver; no cuda backend plugin found"
    );
    let r = report(&[("FAKE_CUDA_DEVICES", "0")]);
    assert!(candidate(&r, "cuda")["reason"].as_str().unwrap().starts_with("NVIDIA driver 13.0 found, but no CUDA device"));
    let r = report(&[("FAKE_CUDA_INIT", "999")]);
    assert!(candidate(&r, "cuda")["reason"].as_str().unwrap().contains("cuInit failed (CUDA error 999)"));

    // Naming the backend is an error with the driver's reason.
    let o = llama_tests::llama_cmd(&["run", "--backend", "cuda", "-m", model_path().to_str().unwrap(), "-p", "Hi", "-n", "1"])
        .env("LD_LIBRARY_PATH", dir.path())
        .env("FAKE_CUDA_VERSION", "12040")
        .output()
        .unwrap();
    assert_exit(&o, 4);
    assert!(stderr(&o).contains("too old for this CUDA build"), "{}", stderr(&o));
}

/// The NVIDIA driver is asked in a crash-isolated child, never in the host process: a
/// driver that crashes or hangs in cuInit takes only the child down. The stand-in driver
/// records every process that loads it or calls cuInit.
#[test]
fn the_host_process_never_loads_the_cuda_driver() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(built_library("fixture_fake_cuda"), dir.path().join("libcuda.so.1")).unwrap();
    let model = model_path();
    for args in [&["backends", "--json"][..], &["backends", "--json", "-m", model.to_str().unwrap()]] {
        let record = dir.path().join(format!("driver-calls-{}", args.len()));
        let child = llama_tests::llama_cmd(args)
            .env("LD_LIBRARY_PATH", dir.path())
            .env("FAKE_CUDA_DEVICES", "2")
            .env("FAKE_CUDA_RECORD", &record)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let host = child.id();
        let o = child.wait_with_output().unwrap();
        assert_exit(&o, 0);
        let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(candidate(&r, "cuda")["reason"], "NVIDIA driver 13.0 with 2 device(s); no cuda backend plugin found");
        let calls = std::fs::read_to_string(&record).unwrap_or_default();
        let events: Vec<(&str, u32)> = calls
            .lines()
            .map(|l| {
                let (event, pid) = l.split_once(' ').unwrap_or_else(|| panic!("bad record line {l:?}"));
                (event, pid.parse().unwrap())
            })
            .collect();
        assert!(events.iter().any(|&(e, _)| e == "cuInit"), "{args:?}: the driver was never asked: {calls:?}");
        assert!(
            events.iter().all(|&(_, pid)| pid != host),
            "{args:?}: the host process (pid {host}) loaded the driver itself (event pid):\n{calls}"
        );
    }
    // So a driver that crashes in cuInit takes only its child down.
    let o = llama_tests::llama_cmd(&["backends", "--json"]).env("LD_LIBRARY_PATH", dir.path()).env("FAKE_CUDA_INIT", "segv").output().unwrap();
    assert_exit(&o, 0);
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(candidate(&r, "cuda")["reason"], "the NVIDIA driver query crashed: signal 11 (SIGSEGV); no cuda backend plugin found");
    assert_eq!(candidate(&r, "cpu")["verdict"], "selected");
}

/// A library user without isolation gets the driver asked in its own process; then the
/// driver stays loaded after cuInit (unloading it under its own threads and handlers is a
/// crash waiting to happen). The test runs itself again with the stand-in driver on
/// LD_LIBRARY_PATH, which the dynamic loader reads only when a process starts.
#[test]
fn an_in_process_driver_query_never_unloads_the_driver() {
    const CHILD: &str = "LLAMA_TESTS_IN_PROCESS_DRIVER";
    if std::env::var_os(CHILD).is_some() {
        let d = llama_host::hardware::cuda_driver();
        assert!(d.is_ok(), "{d:?}");
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(maps.contains("/libcuda.so.1"), "the driver was unloaded after cuInit");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(built_library("fixture_fake_cuda"), dir.path().join("libcuda.so.1")).unwrap();
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "an_in_process_driver_query_never_unloads_the_driver", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("LD_LIBRARY_PATH", dir.path())
        .output()
        .unwrap();
    assert!(o.status.success() && stdout(&o).contains("1 passed"), "{:?}\n{}\n{}", o.status, stdout(&o), stderr(&o));
}

/// `--gpu-layers` (`-ngl`) parses, validates and reaches llama.cpp; asking for GPU layers
/// where only the CPU is usable is a warning under auto, an error when a GPU backend is named.
#[test]
fn gpu_layers_reach_llama_cpp_and_warn_without_a_gpu() {
    let m = model_path();
    let m = m.to_str().unwrap();
    let o = llama_tests::llama(&["run", "-vv", "-m", m, "-ngl", "7", "-p", "Hi", "-n", "1"]);
    assert_exit(&o, 0);
    let err = stderr(&o);
    assert!(err.contains("--gpu-layers asks for GPU offload, but no GPU backend is usable here (cuda: "), "{err}");
    assert!(err.contains("n_gpu_layers = 7"), "the value did not reach the backend:\n{err}");
    // auto on the CPU: no warning, nothing offloaded.
    let o = llama_tests::llama(&["run", "-vv", "-m", m, "-p", "Hi", "-n", "1"]);
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("n_gpu_layers = 0") && !stderr(&o).contains("asks for GPU offload"), "{}", stderr(&o));
    // all = -1 (llama.cpp's "every layer"), also from the environment.
    let o = llama_tests::llama_cmd(&["run", "-vv", "-m", m, "-p", "Hi", "-n", "1"]).env("LLAMA_GPU_LAYERS", "all").output().unwrap();
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("n_gpu_layers = -1"), "{}", stderr(&o));
    // Bad values name the flag; a named GPU backend that cannot run is an error.
    for bad in ["-3", "lots"] {
        let o = llama_tests::llama(&["run", "-m", m, "-ngl", bad, "-p", "Hi"]);
        assert_exit(&o, 2);
        assert!(stderr(&o).contains("--gpu-layers"), "{}", stderr(&o));
    }
    let o = llama_tests::llama(&["run", "--backend", "cuda", "-m", m, "-ngl", "all", "-p", "Hi", "-n", "1"]);
    assert_exit(&o, 4);
    assert!(stderr(&o).contains("backend 'cuda' cannot be used here"), "{}", stderr(&o));
}

/// `--device`, `--split-mode` and `--main-gpu` reach the backend; GPU names are a warning
/// under auto (the CPU runs, nothing offloaded) and a typed error when the CPU is named.
#[test]
fn offload_devices_and_split_mode_reach_the_backend() {
    let m = model_path();
    let m = m.to_str().unwrap();
    let o = llama_tests::llama(&["run", "-vv", "-m", m, "-dev", "CUDA0,CUDA1", "-sm", "row", "-mg", "1", "-p", "Hi", "-n", "1"]);
    assert_exit(&o, 0);
    let err = stderr(&o);
    assert!(err.contains("--device, --main-gpu ask for GPU offload, but no GPU backend is usable here"), "{err}");
    // Under auto on the CPU, the GPU names are dropped (the warning said so); the rest arrive.
    assert!(err.contains("split_mode = row, main_gpu = 1, devices = all"), "{err}");
    let o = llama_tests::llama(&["run", "-vv", "-m", m, "--device", "none", "--split-mode", "none", "-p", "Hi", "-n", "1"]);
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("split_mode = none, main_gpu = 0, devices = none"), "{}", stderr(&o));
    // The CPU backend named: a GPU device is a parameter error naming what it has.
    let o = llama_tests::llama(&["run", "--backend", "cpu", "-m", m, "--device", "CUDA0", "-p", "Hi", "-n", "1"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("invalid device: no device 'CUDA0' (this backend has no GPU devices)"), "{}", stderr(&o));
    // Bad values name the flag; the config file and the environment are read too.
    for bad in [&["--split-mode", "diagonal"][..], &["--main-gpu", "-2"], &["--device", "CUDA0,"]] {
        let mut args = vec!["run", "-m", m, "-p", "Hi"];
        args.extend_from_slice(bad);
        let o = llama_tests::llama(&args);
        assert_exit(&o, 2);
        assert!(stderr(&o).contains(bad[0]), "{}", stderr(&o));
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "[defaults]\nsplit-mode = \"none\"\nmain-gpu = 2\ndevice = \"none\"\n").unwrap();
    let o = llama_tests::llama(&["run", "-vv", "--config", cfg.to_str().unwrap(), "-m", m, "-p", "Hi", "-n", "1"]);
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("split_mode = none, main_gpu = 2, devices = none"), "{}", stderr(&o));
    let o = llama_tests::llama_cmd(&["run", "-vv", "-m", m, "-p", "Hi", "-n", "1"]).env("LLAMA_SPLIT_MODE", "row").output().unwrap();
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("split_mode = row"), "{}", stderr(&o));
    // The same flags and config keys reach `llama bench` and `llama serve`.
    let c = cfg.to_str().unwrap();
    let o = llama_tests::llama(&["bench", "-vv", "--config", c, "-m", m, "-p", "0", "-n", "1", "-r", "1", "--concurrency", "0", "--no-prefix-test"]);
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("split_mode = none, main_gpu = 2, devices = none"), "{}", stderr(&o));
    std::fs::write(&cfg, "[defaults]\ndevice = \"CUDA9\"\n").unwrap();
    let o = llama_tests::llama(&["serve", "--config", c, "--backend", "cpu", "-m", m, "--port", "0"]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("invalid device: no device 'CUDA9'"), "{}", stderr(&o));
}

/// `llama backends -m MODEL` estimates the layers that fit on each GPU backend's devices,
/// from the GGUF header: here against the stand-in driver's memory sizes.
#[test]
fn backends_with_a_model_shows_how_many_layers_fit() {
    let m = model_path();
    let m = m.to_str().unwrap();
    let r = report_json(&["-m", m]);
    assert_eq!(r["model"]["footprint"]["n_layer"], 18, "{:#}", r["model"]);
    assert_eq!(r["model"]["gpus"].as_array().unwrap().len(), 0, "no GPU here: {:#}", r["model"]);
    let o = llama(&["backends", "-m", m]);
    assert!(stdout(&o).contains("18 layers + output head") && stdout(&o).contains("no GPU device found: every layer runs on the CPU"), "{}", stdout(&o));

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(built_library("fixture_fake_cuda"), dir.path().join("libcuda.so.1")).unwrap();
    let fit = |mem_mib: &str, ctx: &str| -> serde_json::Value {
        let o = llama_tests::llama_cmd(&["backends", "--json", "-m", m, "-c", ctx]).env("LD_LIBRARY_PATH", dir.path()).env("FAKE_CUDA_MEM_MIB", mem_mib).output().unwrap();
        assert_exit(&o, 0);
        let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        r["model"]["gpus"][0].clone()
    };
    let big = fit("81920", "4096");
    assert_eq!((big["backend"].as_str(), big["fit"]["layers"].as_u64(), big["fit"]["all"].as_u64()), (Some("cuda"), Some(19), Some(19)), "{big:#}");
    // llama.cpp offloads the output head first (here a 178 MB copy of the tied embeddings),
    // then layers from the last. 1400 MiB less the 1 GiB margin leaves 376 MiB: the head and
    // 10 layers of ~4 MB weights + 16 MiB KV cache each at 16384 tokens. 1200 MiB: the head.
    let small = fit("1400", "16384");
    assert_eq!(small["fit"]["layers"].as_u64(), Some(11), "{small:#}");
    assert_eq!(fit("1200", "16384")["fit"]["layers"].as_u64(), Some(1));
    let tiny = fit("512", "4096");
    assert_eq!(tiny["fit"]["layers"].as_u64(), Some(0), "{tiny:#}");
}
