"""lm-evaluation-harness against `m1jax serve`: its local-completions model, a local task file, nothing downloaded.

Runs where the reference venv (.refvenv, with lm-eval) exists; skipped elsewhere. lm-eval tokenizes with the
checkpoint's tokenizer.json (through transformers), sends token ids to /v1/completions with echo and logprobs
(log-likelihood: a multiple-choice task) and plain generation (generate_until). Its log-likelihoods are checked
against our own forward pass: log_softmax(M1ForCausalLM(ids)) summed over the continuation tokens.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REF_PYTHON = os.path.join(ROOT, ".refvenv", "bin", "python")


def _lm_eval_available() -> bool:
    if not os.path.exists(REF_PYTHON):
        return False
    probe = subprocess.run([REF_PYTHON, "-c", "import lm_eval, tenacity, aiohttp"], capture_output=True,
                           timeout=120)
    return probe.returncode == 0


SKIP_REASON = "needs .refvenv with lm-eval[api] (.refvenv/bin/pip install 'lm-eval[api]')"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _lm_eval_available(), reason=SKIP_REASON)]

MC_DOCS = [{"question": "The sky is", "choices": [" blue", " green", " loud"], "label": 0},
           {"question": "Two plus two is", "choices": [" four", " five"], "label": 0},
           {"question": "Water is", "choices": [" wet", " dry", " red", " tall"], "label": 0}]
GEN_DOCS = [{"question": "Say yes:", "answer": " yes"}, {"question": "Say no:", "answer": " no"}]

TASKS = """\
task: m1jax_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
---
task: m1jax_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def bpe_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a small trained BPE tokenizer (both lm-eval and the server read it)."""
    from m1jax.tokenizer import train_bpe
    directory = tmp_path_factory.mktemp("bpe-ckpt")
    for name in os.listdir(tiny_checkpoint):
        shutil.copy(os.path.join(tiny_checkpoint, name), directory)
    texts = [d["question"] + c for d in MC_DOCS for c in d["choices"]] + [d["question"] + d["answer"] for d in GEN_DOCS]
    train_bpe(texts * 20, 300, str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<beginning_of_sentence>",
        "eos_token": "<end_of_sentence>"}))
    return str(directory)


@pytest.fixture(scope="module")
def server(bpe_checkpoint):
    process = subprocess.Popen(
        [sys.executable, "-m", "m1jax.cli", "serve", "--checkpoint", bpe_checkpoint, "--port", "0", "--max-batch", "4",
         "--max-context", "128", "--chunk-size", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines, ready = [], threading.Event()
    url = {}

    def read():
        for line in process.stdout:
            lines.append(line)
            if "ready on http://" in line:
                url["base"] = line.split("ready on ", 1)[1].strip()
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(600):
        process.kill()
        pytest.fail("m1jax serve did not become ready:\n" + "".join(lines[-30:]))
    yield url["base"]
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def _direct_loglikelihood(checkpoint, ids, continuation_len):
    import jax
    from m1jax.checkpoint.load import load_any
    from m1jax.model import M1ForCausalLM
    config, params = load_any(checkpoint)
    logits = M1ForCausalLM(config).apply({"params": params}, np.asarray([ids], np.int32)).logits[0]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    n = len(ids)
    return float(sum(logp[t - 1, ids[t]] for t in range(n - continuation_len, n)))


def test_lm_eval_local_completions(bpe_checkpoint, server, tmp_path):
    mc, gen = tmp_path / "mc.jsonl", tmp_path / "gen.jsonl"
    mc.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    gen.write_text("".join(json.dumps(d) + "\n" for d in GEN_DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    mc_yaml, gen_yaml = TASKS.format(mc=mc, gen=gen).split("---\n")
    (tasks / "mc.yaml").write_text(mc_yaml)
    (tasks / "gen.yaml").write_text(gen_yaml)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(tmp_path / "hf-cache"))
    model_args = (f"model={bpe_checkpoint},base_url={server}/v1/completions,tokenizer_backend=huggingface,"
                  "num_concurrent=1,max_retries=1,tokenized_requests=True")
    run = subprocess.run(
        [REF_PYTHON, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
         "--tasks", "m1jax_tiny_mc,m1jax_tiny_gen", "--include_path", str(tasks), "--output_path", str(out),
         "--log_samples", "--batch_size", "1"],
        capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results_file = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    assert results_file, run.stdout[-2000:]
    with open(results_file[0]) as f:
        results = json.load(f)["results"]
    assert 0.0 <= results["m1jax_tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["m1jax_tiny_gen"]["exact_match,none"] <= 1.0

    from m1jax.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(bpe_checkpoint)
    samples_file = glob.glob(str(out / "**" / "samples_m1jax_tiny_mc_*.jsonl"), recursive=True)[0]
    checked = 0
    with open(samples_file) as f:
        for line in f:
            sample = json.loads(line)
            for args, resp in zip(sample["arguments"].values(), sample["resps"]):
                context, continuation = args["arg_0"], args["arg_1"]
                whole = tokenizer.encode(context + continuation)  # lm-eval's split: whole[len(context):]
                n_context = len(tokenizer.encode(context))
                expected = _direct_loglikelihood(bpe_checkpoint, whole, len(whole) - n_context)
                # float32 forward on both sides (server: chunked prefill; here: one pass) over < 64 tokens
                assert float(resp[0][0]) == pytest.approx(expected, abs=1e-3), (context, continuation)
                checked += 1
    assert checked == sum(len(d["choices"]) for d in MC_DOCS)
