# The OCI image: `nix build .#oci && ./result | docker load`.
#
# dockerTools facts: NIX_FACTS.md §5 (streamLayeredImage arguments, caCertificates, the NVIDIA
# container runtime variables, where the driver is mounted and why LD_LIBRARY_PATH must name it).
{
  lib,
  dockerTools,
  pagoda,
  # true for the CUDA image (GPU runtime variables), false for the CPU one.
  gpu ? true,
}:

dockerTools.streamLayeredImage {
  name = if gpu then "pagoda" else "pagoda-cpu";
  tag = pagoda.version;
  contents = [ dockerTools.caCertificates ];
  # Writable scratch space and the model cache mount point for a non-root user on a read-only root
  # filesystem (the Helm chart mounts emptyDirs over both).
  extraCommands = ''
    mkdir -p tmp models
    chmod 1777 tmp models
  '';
  config = {
    # `docker run IMAGE` serves; Kubernetes passes `serve ...` or `sync ...` as arguments, so the
    # subcommand is the default command rather than part of the entrypoint.
    Entrypoint = [ (lib.getExe pagoda) ];
    Cmd = [ "serve" ];
    User = "65532:65532";
    WorkingDir = "/tmp";
    ExposedPorts = {
      "8000/tcp" = { };
    };
    Volumes = {
      "/models" = { };
    };
    Env = [
      "HOME=/tmp"
      "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"
      "PAGODA_HOST=0.0.0.0"
      "PAGODA_PORT=8000"
      "PAGODA_DOWNLOAD_DIR=/models"
    ]
    ++ lib.optionals gpu [
      "NVIDIA_VISIBLE_DEVICES=all"
      "NVIDIA_DRIVER_CAPABILITIES=compute,utility"
      # The container toolkit refuses to start the image on a driver too old for this CUDA.
      "NVIDIA_REQUIRE_CUDA=cuda>=${pagoda.cudaMajorMinorVersion}"
      # Where the NVIDIA container toolkit, GPU operators and NixOS hosts put libcuda.
      "LD_LIBRARY_PATH=/run/opengl-driver/lib:/usr/lib/x86_64-linux-gnu:/usr/lib64:/usr/local/nvidia/lib64:/usr/local/nvidia/lib"
    ];
    Labels = {
      "org.opencontainers.image.title" = "pagoda";
      "org.opencontainers.image.version" = pagoda.version;
    };
  };
}
