//! Links the shared cuBLAS when scripts/build-cuda says where it is (LLAMA_CUDA_LIB_DIR):
//! llama-cpp-sys-2 asks for static cuBLAS, which NVIDIA's wheels do not ship, so the script
//! puts empty stand-in archives first on the search path (LLAMA_CUDA_STUB_DIR) and the real,
//! shared cuBLAS comes in here. Only this plugin links it, never the host binary.
fn main() {
    println!("cargo:rerun-if-env-changed=LLAMA_CUDA_LIB_DIR");
    println!("cargo:rerun-if-env-changed=LLAMA_CUDA_STUB_DIR");
    if let Ok(stubs) = std::env::var("LLAMA_CUDA_STUB_DIR") {
        println!("cargo:rustc-link-search=native={stubs}");
    }
    if let Ok(dir) = std::env::var("LLAMA_CUDA_LIB_DIR") {
        println!("cargo:rustc-link-search=native={dir}");
        println!("cargo:rustc-link-lib=dylib=cublas");
        println!("cargo:rustc-link-lib=dylib=cublasLt");
    }
}
