# Pagoda's binary. `cudaSupport = false` gives `pagoda-cpu`; `true` gives `pagoda`, built with the
# CUDA toolchain and wired to find the CUDA libraries at run time (libcuda always from the driver).
#
# Build recipe facts: NIX_FACTS.md §4 (buildRustPackage: cargoLock, env, cargoTestFlags; no
# useFetchCargoVendor/cargoSha256), §3.3 (autoAddDriverRunpath, addDriverRunpath.driverLink,
# wrapping with LD_LIBRARY_PATH as ollama does), §3.5 (backendStdenv for nvcc).
{
  lib,
  rustPlatform,
  cudaPackages,
  autoAddDriverRunpath,
  addDriverRunpath,
  makeBinaryWrapper,
  cudaSupport ? false,
  # The git commit shown by `pagoda --version`, /version and pagoda_build_info.
  gitCommit ? "unknown",
}:

let
  cargoToml = lib.importTOML ../Cargo.toml;
  # CUDA libraries the CUDA backend opens with dlopen; Nix's glibc ignores ld.so.cache, so they
  # must be on the wrapper's LD_LIBRARY_PATH (NIX_FACTS.md §3.3, trap "dlopen").
  cudaRuntimeLibs = with cudaPackages; [
    cuda_cudart
    libcublas
    cuda_nvrtc
  ];
  # Build with nvcc's compatible host compiler when CUDA is on (NIX_FACTS.md §3.1, backendStdenv).
  buildRustPackage =
    if cudaSupport then rustPlatform.buildRustPackage.override { stdenv = cudaPackages.backendStdenv; } else rustPlatform.buildRustPackage;
in
buildRustPackage {
  pname = if cudaSupport then "pagoda" else "pagoda-cpu";
  inherit (cargoToml.package) version;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../build.rs
      ../kernels
      ../src
      ../assets
      ../tests
      ../benches
    ];
  };

  # Needs a nixpkgs whose importCargoLock downloads from static.crates.io (NIX_FACTS.md §4, the
  # 2026 crates.io 403s); flake.nix pins one.
  cargoLock.lockFile = ../Cargo.lock;

  env = {
    PAGODA_GIT_COMMIT = gitCommit;
  }
  // lib.optionalAttrs cudaSupport {
    # The architectures build.rs compiles kernels/*.cu for with nvcc (into a fatbin the binary
    # embeds): nixpkgs' CUDA capabilities (`config.cudaCapabilities` chooses them), those of 8.0
    # and newer as machine code, plus PTX of the newest for later GPUs (nix/cuda-gencode.nix).
    PAGODA_CUDA_GENCODE = import ./cuda-gencode.nix { inherit lib; } cudaPackages.flags.cudaCapabilities;
  };

  nativeBuildInputs = lib.optionals cudaSupport [
    cudaPackages.cuda_nvcc
    autoAddDriverRunpath
    makeBinaryWrapper
  ];
  # cccl for nvcc's headers (cuda_bf16.h needs nv/target); renamed from cuda_cccl in CUDA 13.3
  # (NIX_FACTS.md §3, the cccl trap).
  buildInputs = lib.optionals cudaSupport (cudaRuntimeLibs ++ [ (cudaPackages.cccl or cudaPackages.cuda_cccl) ]);

  # The integration tests need ../shared/fixtures and local object-store servers, which the build
  # sandbox has not; the unit tests run here, everything runs in the repository's CI.
  cargoTestFlags = [ "--lib" ];

  # libcuda.so.1 comes from the driver (/run/opengl-driver/lib on NixOS, host mounts in
  # containers), never from the store; the toolkit libraries come from the store.
  postFixup = lib.optionalString cudaSupport ''
    wrapProgram $out/bin/pagoda \
      --suffix LD_LIBRARY_PATH : '${addDriverRunpath.driverLink}/lib' \
      --suffix LD_LIBRARY_PATH : '${lib.makeLibraryPath cudaRuntimeLibs}'
  '';

  # The CUDA version the binary was built against: the OCI image states it for the container
  # toolkit (NVIDIA_REQUIRE_CUDA).
  passthru = lib.optionalAttrs cudaSupport { inherit (cudaPackages) cudaMajorMinorVersion; };

  meta = {
    description = "LLM inference server with an OpenAI-compatible API, a paged KV cache and continuous batching";
    license = lib.licenses.asl20;
    mainProgram = "pagoda";
    platforms = [ "x86_64-linux" ];
  };
}
