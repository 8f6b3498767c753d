# nvcc's -gencode flags for Pagoda's kernels from a list of CUDA capabilities (nixpkgs'
# `cudaPackages.flags.cudaCapabilities`, which `config.cudaCapabilities` sets): machine code for
# each capability the kernels support (8.0 and newer: they use bf16 arithmetic and cp.async-era
# features), and PTX of the newest plain one so later GPUs compile it at load. build.rs passes the
# result to nvcc as PAGODA_CUDA_GENCODE.
{ lib }:

capabilities:
let
  # "9.0a" -> { number = "9.0"; digits = "90a"; plain = false; }
  parse = capability: rec {
    number = lib.head (builtins.match "([0-9]+\\.[0-9]+).*" capability);
    digits = lib.replaceStrings [ "." ] [ "" ] capability;
    plain = number == capability;
  };
  supported = lib.filter (c: lib.versionAtLeast c.number "8.0") (map parse capabilities);
  plain = lib.filter (c: c.plain) supported;
  newest = lib.last (lib.sort (a: b: lib.versionOlder a.number b.number) plain);
  sass = c: "-gencode=arch=compute_${c.digits},code=sm_${c.digits}";
in
if plain == [ ] then
  throw "Pagoda's CUDA kernels need a GPU of capability 8.0 or newer; cudaCapabilities lists ${toString capabilities}"
else
  lib.concatStringsSep " " (
    map sass supported ++ [ "-gencode=arch=compute_${newest.digits},code=compute_${newest.digits}" ]
  )
