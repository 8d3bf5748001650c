#!/usr/bin/env bash
# Main job: set up, then register the bundled sample pair with every available method (GPU if present, else
# CPU), print a metrics table and write outputs + per-step pictures to demo_output/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/iterreg demo --out "${1:-demo_output}"
