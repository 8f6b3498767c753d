// Validates custom resources (ServiceMonitor, PodMonitor, KEDA ScaledObject) against the schemas
// the @kubernetes-models packages compile from the operators' CRDs. Reads a JSON list of objects on
// stdin; prints one line per invalid object and exits 1 if any.
import { pathToFileURL } from "node:url";
import path from "node:path";

const modules = process.argv[2];
const load = (p) => import(pathToFileURL(path.join(modules, p)).href);
const monitoring = await load("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js");
const keda = await load("@kubernetes-models/keda/keda.sh/v1alpha1/index.js");
const kinds = {
  "monitoring.coreos.com/v1/ServiceMonitor": monitoring.ServiceMonitor,
  "monitoring.coreos.com/v1/PodMonitor": monitoring.PodMonitor,
  "keda.sh/v1alpha1/ScaledObject": keda.ScaledObject,
};
const input = await new Promise((resolve) => {
  let data = "";
  process.stdin.on("data", (chunk) => (data += chunk));
  process.stdin.on("end", () => resolve(data));
});
let failed = 0;
for (const doc of JSON.parse(input)) {
  const Kind = kinds[`${doc.apiVersion}/${doc.kind}`];
  if (!Kind) {
    console.log(`no schema for ${doc.apiVersion} ${doc.kind}`);
    failed++;
    continue;
  }
  try {
    new Kind(doc).validate();
  } catch (e) {
    console.log(`${doc.kind} ${doc.metadata?.name}: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
