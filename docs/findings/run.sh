#!/usr/bin/env bash
# The studies behind docs/findings.md, on real MNIST (../shared/data), as run for it;
# and the 1D, 3D and regression ones on their own data (series_field, clip_time,
# covid, gunpoint: not in the default list, run them by name).
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

study() {  # NAME (of the study and its report folder), SWEEP (file in sweeps/), then overrides
  local name=$1 sweep=$2; shift 2
  echo "== $name: $BIN/cnnstudy-train -m sweep=$sweep ${MNIST[*]} $*"
  /usr/bin/time -f "$name: %e s wall" "$BIN/cnnstudy-train" -m "sweep=$sweep" "${MNIST[@]}" \
    "hydra.sweeper.study_name=mnist_$name" "$@"
  "$BIN/cnnstudy-report" "mnist_$name" --storage "sqlite:///$STORE/optuna.db" \
    --out "docs/findings/$name"
}

own() {  # NAME, SWEEP or "" (no sweep file), then overrides: a study on its own data
  local name=$1 sweep=$2; shift 2
  local args=("logger.artifact_location=$STORE/mlartifacts" "hydra.sweeper.storage=sqlite:///$STORE/optuna.db"
              "hydra.sweep.dir=$STORE/multirun/\${now:%H-%M-%S}" "hydra.sweeper.study_name=$name" "$@")
  [ -z "$sweep" ] || args=("sweep=$sweep" "${args[@]}")
  echo "== $name: $BIN/cnnstudy-train -m ${args[*]}"
  /usr/bin/time -f "$name: %e s wall" "$BIN/cnnstudy-train" -m "${args[@]}"
  "$BIN/cnnstudy-report" "$name" --storage "sqlite:///$STORE/optuna.db" --out "docs/findings/$name"
}

confirm() {  # STUDY, then overrides: the fastest trial of `fastest` at 99.0% validation
  # accuracy, trained with 3 new seeds; each seed's accuracies and time in STUDY.yaml
  local name=$1; shift
  "$BIN/cnnstudy-train" -m seed=1,2,3 "${MNIST[@]}" "hydra.sweeper.study_name=$name" \
    hydra.sweeper.report=false trainer.progress_bar=false logger.log_model=false \
    model.stages=2 model.filters=8 model.filter_growth=2.0 model.receptive_field=5 \
    model.padding=1 model.hidden_units=44 optimizer.lr=0.01254872656592939 \
    trainer.max_epochs=4 "$@"
  "$BIN/python" - "$STORE" "$name" > "docs/findings/$name.yaml" <<'PY'
import sys, optuna, yaml
study = optuna.load_study(study_name=sys.argv[2], storage=f"sqlite:///{sys.argv[1]}/optuna.db")
keep = ("val/acc", "test/acc", "time/fit_s", "model/params")
print(yaml.safe_dump([{"seed": t.params["seed"], **{k: t.user_attrs["metrics"][k] for k in keep}}
                      for t in study.trials if t.values], sort_keys=False), end="")
PY
  cat "docs/findings/$name.yaml"
}

gunpoint() {  # the seed network on GunPoint, 100 epochs, 3 seeds: each seed's accuracies
  "$BIN/cnnstudy-train" -m data=ucr data.problem=GunPoint seed=0,1,2 trainer.max_epochs=100 \
    trainer.progress_bar=false hydra.sweeper.report=false hydra.sweeper.study_name=gunpoint \
    "logger.artifact_location=$STORE/mlartifacts" "hydra.sweeper.storage=sqlite:///$STORE/optuna.db" \
    "hydra.sweep.dir=$STORE/multirun/\${now:%H-%M-%S}"
  "$BIN/python" - "$STORE" > docs/findings/gunpoint.yaml <<'PY'
import sys, optuna, yaml
study = optuna.load_study(study_name="gunpoint", storage=f"sqlite:///{sys.argv[1]}/optuna.db")
keep = ("val/acc", "test/acc", "time/fit_s", "model/params")
print(yaml.safe_dump([{"seed": t.params["seed"], **{k: t.user_attrs["metrics"][k] for k in keep}}
                      for t in sorted(study.trials, key=lambda t: t.params["seed"]) if t.values],
                     sort_keys=False), end="")
PY
  cat docs/findings/gunpoint.yaml
}

todo=("$@")
[ ${#todo[@]} -gt 0 ] || todo=(hidden_units hidden_units_5 hidden_units_2 receptive_field
  stride_padding filters pooling dropout activation architecture fastest confirm confirm_torch)
for name in "${todo[@]}"; do
  case $name in
    hidden_units)    study hidden_units hidden_units trainer.max_epochs=2 hydra.sweeper.seeds=2 ;;
    receptive_field) study receptive_field receptive_field trainer.max_epochs=2 ;;
    filters)         study filters filters trainer.max_epochs=2 ;;
    pooling)         study pooling pooling trainer.max_epochs=2 ;;
    stride_padding)  study stride_padding stride_padding trainer.max_epochs=2 ;;
    dropout)         study dropout dropout trainer.max_epochs=2 ;;
    activation)      study activation activation trainer.max_epochs=2 ;;
    hidden_units_5)  study hidden_units_5 hidden_units trainer.max_epochs=2 hydra.sweeper.seeds=2 \
                       "data.classes=[0,1,2,3,4]" data.num_classes=0 ;;
    hidden_units_2)  study hidden_units_2 hidden_units trainer.max_epochs=2 hydra.sweeper.seeds=2 \
                       "data.classes=[0,1]" data.num_classes=0 ;;
    architecture)    study architecture architecture hydra.sweeper.n_trials=16 \
                       "trainer.max_epochs=choice(3, 6, 10)" \
                       "model.filters=int(tag(log, interval(4, 32)))" ;;
    fastest)         study fastest architecture hydra.sweeper.n_trials=24 model.stages=2 \
                       "trainer.max_epochs=choice(2, 3, 4, 5)" \
                       "model.filters=int(tag(log, interval(8, 32)))" \
                       "model.hidden_units=int(tag(log, interval(32, 256)))" \
                       "optimizer.lr=tag(log, interval(0.003, 0.03))" ;;
    confirm)         confirm confirm ;;
    confirm_torch)   confirm confirm_torch_kernels trainer.cpu_kernels=false ;;
    series_field)    own series_field series_field ;;
    clip_time)       own clip_time clip_time "data.root=$(cd .. && pwd)/shared/data" ;;
    covid)           own covid "" data=ucr data.problem=Covid3Month hydra.sweeper.objective=val/rmse \
                       hydra.sweeper.direction=minimize "model.hidden_units=choice(16,64,256)" \
                       "optimizer.lr=tag(log,interval(0.0003,0.01))" hydra.sweeper.n_trials=12 \
                       hydra.sweeper.seeds=2 trainer.max_epochs=30 trainer.progress_bar=false ;;
    gunpoint)        gunpoint ;;
    *) echo "unknown study $name" >&2; exit 2 ;;
  esac
done
