# NixOS VM test (needs KVM): an S3-compatible store (MinIO) in one node holds Pagoda's demo model
# as a Hugging Face folder; the appliance node syncs it with `pagoda-model-sync.service`, serves
# it, and answers /v1/completions, /metrics, the node exporter and a local Prometheus.
#
# runNixOSTest and the machine API: NIX_FACTS.md §8. services.minio's `listenAddress` and
# `rootCredentialsFile` and the `minio-client` package read in nixpkgs'
# nixos/modules/services/web-servers/minio.nix and nixos/tests/minio.nix.
{
  pkgs,
  pagodaModule,
  pagodaCpu,
}:

let
  accessKey = "pagoda-test";
  secretKey = "pagoda-test-secret";
in
pkgs.testers.runNixOSTest {
  name = "pagoda-appliance";

  nodes.store = {
    services.minio = {
      enable = true;
      listenAddress = ":9000";
      rootCredentialsFile = pkgs.writeText "minio-credentials" ''
        MINIO_ROOT_USER=${accessKey}
        MINIO_ROOT_PASSWORD=${secretKey}
      '';
    };
    networking.firewall.allowedTCPPorts = [ 9000 ];
    environment.systemPackages = [
      pkgs.minio-client
      pagodaCpu
    ];
  };

  nodes.server = {
    imports = [ pagodaModule ];
    virtualisation.memorySize = 2048;
    environment.systemPackages = [ pkgs.jq ];
    services.pagoda = {
      enable = true;
      package = pagodaCpu;
      model = "s3://models/demo";
      servedModelName = "demo";
      settings.max-model-len = 512;
      environment = {
        AWS_ACCESS_KEY_ID = accessKey;
        AWS_SECRET_ACCESS_KEY = secretKey;
        AWS_REGION = "us-east-1";
        PAGODA_ENDPOINT = "http://store:9000";
        PAGODA_ALLOW_HTTP = "true";
      };
    };
    pagoda.monitoring = {
      enable = true;
      prometheus.enable = true;
    };
  };

  testScript = ''
    import json

    store.start()
    store.wait_for_unit("minio.service")
    store.wait_for_open_port(9000)
    store.succeed(
        "pagoda export-demo /tmp/demo",
        "mc alias set local http://127.0.0.1:9000 ${accessKey} ${secretKey}",
        "mc mb local/models",
        "mc cp --recursive /tmp/demo/ local/models/demo/",
    )

    server.start()
    server.wait_for_unit("pagoda-model-sync.service")
    server.succeed("find /var/lib/pagoda/models -name config.json | grep -q .")
    server.wait_for_unit("pagoda.service")
    server.wait_for_open_port(8000)

    with subtest("completions"):
        body = json.dumps({"model": "demo", "prompt": "Hello", "max_tokens": 4, "ignore_eos": True})
        reply = json.loads(server.succeed(
            f"curl -sf http://127.0.0.1:8000/v1/completions -H 'content-type: application/json' -d '{body}'"
        ))
        assert reply["model"] == "demo", reply
        assert reply["usage"]["completion_tokens"] == 4, reply

    with subtest("pagoda metrics"):
        metrics = server.succeed("curl -sf http://127.0.0.1:8000/metrics")
        assert 'vllm:generation_tokens_total{model_name="demo"} 4' in metrics, metrics

    with subtest("node exporter"):
        node = server.succeed("curl -sf http://127.0.0.1:9100/metrics")
        assert 'node_systemd_unit_state{name="pagoda.service",state="active"' in node

    with subtest("prometheus scrapes node and pagoda"):
        server.wait_for_unit("prometheus.service")
        server.wait_until_succeeds(
            "curl -sf http://127.0.0.1:9090/api/v1/targets"
            " | jq -e '[.data.activeTargets[] | select(.health == \"up\") | .labels.job] | sort == [\"node\", \"pagoda\"]'",
            timeout=120,
        )

    with subtest("a restarted sync finds the model in place, and the server comes back"):
        # Requires= carries the restart over to pagoda.service.
        server.succeed("systemctl restart pagoda-model-sync.service")
        server.succeed("journalctl -u pagoda-model-sync.service -o cat | grep -q 'model already in sync'")
        server.wait_for_open_port(8000)
  '';
}
