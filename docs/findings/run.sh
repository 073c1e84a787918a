#!/usr/bin/env bash
# The studies behind docs/findings.md, on real MNIST (../shared/data), as run for it.
# Each writes its report into docs/findings/NAME/; the Optuna storage and the MLflow
# store go to a scratch folder (FINDINGS_STORE, default /tmp/cnnstudy-findings).
#   bash docs/findings/run.sh                      # every study, one after another
#   bash docs/findings/run.sh hidden_units filters # some of them
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=.venv/bin
STORE=${FINDINGS_STORE:-/tmp/cnnstudy-findings}
mkdir -p "$STORE"
export MLFLOW_TRACKING_URI="sqlite:///$STORE/mlflow.db"
MNIST=(data=mnist "data.root=$(cd .. && pwd)/shared/data" trainer.num_threads=2
       "logger.artifact_location=$STORE/mlartifacts" logger.log_images=false
       "hydra.sweeper.storage=sqlite:///$STORE/optuna.db" "hydra.sweep.dir=$STORE/multirun/\${now:%H-%M-%S}")

study() {  # NAME, then overrides
  local name=$1; shift
  echo "== $name: $BIN/cnnstudy-train -m sweep=$name ${MNIST[*]} $*"
  /usr/bin/time -f "$name: %e s wall" "$BIN/cnnstudy-train" -m "sweep=$name" "${MNIST[@]}" \
    "hydra.sweeper.study_name=mnist_$name" "$@"
  "$BIN/cnnstudy-report" "mnist_$name" --storage "sqlite:///$STORE/optuna.db" \
    --out "docs/findings/$name"
}

todo=("$@")
[ ${#todo[@]} -gt 0 ] || todo=(hidden_units receptive_field filters pooling architecture)
for name in "${todo[@]}"; do
  case $name in
    hidden_units)    study hidden_units trainer.max_epochs=2 hydra.sweeper.seeds=2 ;;
    receptive_field) study receptive_field trainer.max_epochs=2 ;;
    filters)         study filters trainer.max_epochs=2 hydra.sweeper.n_trials=12 ;;
    pooling)         study pooling trainer.max_epochs=2 hydra.sweeper.n_trials=12 ;;
    architecture)    study architecture hydra.sweeper.n_trials=16 \
                       "trainer.max_epochs=choice(3, 6, 10)" \
                       "model.filters=int(tag(log, interval(4, 32)))" ;;
    *) echo "unknown study $name" >&2; exit 2 ;;
  esac
done
