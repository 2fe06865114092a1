//! Builds the TensorRT shim (`src/backend/tensorrt/shim.cpp`) when the `tensorrt` feature is on.
//! Nothing else needs a build script: the CUDA kernels are compiled ahead and embedded.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "tensorrt")]
    tensorrt::build();
}

#[cfg(feature = "tensorrt")]
mod tensorrt {
    use std::path::{Path, PathBuf};

    fn env_path(name: &str) -> Option<PathBuf> {
        println!("cargo::rerun-if-env-changed={name}");
        std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
    }

    /// The TensorRT headers: TENSORRT_INCLUDE_DIR, else TENSORRT_ROOT/include.
    fn tensorrt_include() -> PathBuf {
        let dir = env_path("TENSORRT_INCLUDE_DIR").or_else(|| env_path("TENSORRT_ROOT").map(|r| r.join("include")));
        let Some(dir) = dir else {
            panic!(
                "the `tensorrt` feature compiles a shim against the TensorRT 10 headers: set TENSORRT_INCLUDE_DIR to the directory holding NvInferRuntime.h, or TENSORRT_ROOT to the SDK root"
            );
        };
        let version = dir.join("NvInferVersion.h");
        let text = std::fs::read_to_string(&version)
            .unwrap_or_else(|e| panic!("{}: {e} (is this a TensorRT include directory?)", version.display()));
        let major = ["TRT_MAJOR_ENTERPRISE", "NV_TENSORRT_MAJOR"].iter().find_map(|name| {
            text.lines().find_map(|line| {
                let rest = line.trim().strip_prefix("#define ")?.strip_prefix(name)?;
                rest.split_whitespace().next()?.parse::<u32>().ok()
            })
        });
        match major {
            Some(10) => {}
            Some(other) => {
                panic!("{} is TensorRT {other}; gpt2rt's shim is written for TensorRT 10.x", version.display())
            }
            None => panic!("{}: no TensorRT major version found", version.display()),
        }
        println!("cargo::rerun-if-changed={}", version.display());
        dir
    }

    /// `cuda_runtime_api.h`: CUDA_INCLUDE_DIR, CUDA_PATH/include or CUDA_HOME/include when one has
    /// it, else the two-typedef stand-in in src/backend/tensorrt/cuda_stub.
    fn cuda_include() -> PathBuf {
        let candidates = [
            env_path("CUDA_INCLUDE_DIR"),
            env_path("CUDA_PATH").map(|p| p.join("include")),
            env_path("CUDA_HOME").map(|p| p.join("include")),
        ];
        for dir in candidates.into_iter().flatten() {
            if dir.join("cuda_runtime_api.h").is_file() {
                return dir;
            }
        }
        Path::new("src/backend/tensorrt/cuda_stub").to_path_buf()
    }

    pub fn build() {
        let trt = tensorrt_include();
        let cuda = cuda_include();
        for f in ["src/backend/tensorrt/shim.cpp", "src/backend/tensorrt/cuda_stub/cuda_runtime_api.h"] {
            println!("cargo::rerun-if-changed={f}");
        }
        let mut build = cc::Build::new();
        build.cpp(true).file("src/backend/tensorrt/shim.cpp").warnings(true);
        if build.get_compiler().is_like_msvc() {
            build.include(&trt).include(&cuda).flag("/std:c++17").flag("/EHsc");
        } else {
            // -isystem: warnings in TensorRT's own headers are not ours to fix.
            build.flag("-isystem").flag(&trt).flag("-isystem").flag(&cuda);
            build.flag("-std=c++17").flag("-Wextra").flag("-Wno-deprecated-declarations");
        }
        build.compile("gpt2rt_trt_shim");
    }
}
