"""Write the notebooks in notebooks/ (without outputs) from the cell sources below.

    python tools/make_notebooks.py
CI executes them top to bottom and counts the figures each one shows (tests/test_notebooks.py);
regenerate after editing here. Figures use ipykernel's inline backend (`%matplotlib inline`), so
Jupyter shows them under their cells; never select a non-interactive backend such as Agg here,
or plt.show() displays nothing.
"""
import nbformat as nbf

NB = {}

NB["01_positions_and_regions.ipynb"] = [
    ("md", "# 01 — LaMPE positions and regions\n\nHow LaMPE re-positions keys: the float32 mapped ids "
           "(spec §1.1), the three regions of each query row (local window, compressed map, sink) and the "
           "relative positions a row ends up seeing. Everything here comes from `lampe.plan`."),
    ("code", "%matplotlib inline\nimport numpy as np\nimport matplotlib.pyplot as plt\n"
             "import lampe\n\n"
             "cfg = lampe.LampeConfig(window=16, sink=4, mapping_length=40)\n"
             "L = 200\nplan = lampe.plan(L, cfg)\nplan"),
    ("md", "## Mapped ids\nA floor-linear map of `[0, L-1]` onto `[0, U]`: runs of about `(L-1)/U` "
           "consecutive keys share one position."),
    ("code", "fig, ax = plt.subplots(figsize=(6, 3))\nax.step(np.arange(L), plan.mapped_ids, where='post')\n"
             "ax.set_xlabel('key index j'); ax.set_ylabel('mapped id m[j]')\n"
             "ax.set_title(f'L={L}, U={plan.mapping_length}: R={plan.sink_size}, b1={plan.bias_map}, "
             "b2={plan.bias_sink}')\nplt.show()"),
    ("md", "## Region map\nFor every (query, key) pair: which region covers it. Pairs at distance H and "
           "L − R are covered twice in mode \"lampe\" (the authors' boundary duplicates)."),
    ("code", "t = plan.table()\ncode = {'local': 1, 'map': 2, 'sink': 3}\ngrid = np.zeros((L, L))\n"
             "for q, k, r in zip(t['query'], t['key'], t['region']):\n    grid[q, k] += code[r] * (10 if grid[q, k] else 1)\n"
             "fig, ax = plt.subplots(figsize=(5, 5))\nax.imshow(np.where(grid == 0, np.nan, np.log1p(grid)), cmap='tab20')\n"
             "ax.set_xlabel('key'); ax.set_ylabel('query'); ax.set_title('regions (duplicates in distinct colours)')\n"
             "plt.show()\n"
             "qk, counts = np.unique(t['query'] * L + t['key'], return_counts=True)\n"
             "print('distances counted twice:', sorted({int(x // L - x % L) for x in qk[counts > 1]}))"),
    ("md", "## Relative-position profile of the last row and of decode steps\nThe last prompt row sees "
           "true distances up to H, compressed distances up to about H + U, then the sink. Rows after the "
           "prompt (shifted decode, spec §0) keep the same profile."),
    ("code", "fig, ax = plt.subplots(figsize=(6, 3))\nfor pos, style in [(L - 1, '-'), (L + 5, '--'), (L + 50, ':')]:\n"
             "    rel = np.zeros(pos + 1)\n    for r in plan.regions(pos):\n"
             "        rel[r.key_lo:r.key_hi + 1] = r.qpos - r.kpos\n"
             "    ax.plot(pos - np.arange(pos + 1), rel, style, label=f'query {pos}')\n"
             "ax.set_xlabel('distance i - j'); ax.set_ylabel('relative position seen')\nax.legend(); plt.show()"),
    ("md", "## Length-aware mapping length\nThe scaled sigmoid presets (spec §4) and the generic rule."),
    ("code", "Ls = np.arange(4096, 131073, 2048)\nfig, ax = plt.subplots(figsize=(6, 3))\n"
             "for p in lampe.PRESETS:\n    ax.plot(Ls, [lampe.mapping_length(int(x), p) for x in Ls], label=p)\n"
             "ax.plot(Ls, [lampe.mapping_length(int(x), 'auto', pretrained_window=8192) for x in Ls], 'k--', "
             "label='auto (W=8192)')\nax.set_xlabel('prompt length L'); ax.set_ylabel('U'); ax.legend(); plt.show()"),
]

NB["02_passkey_and_perplexity.ipynb"] = [
    ("md", "# 02 — Passkey and perplexity on the tiny model\n\nThe bundled byte-level Llama (pretrained "
           "window 256) evaluated beyond its window: the original model, RoPE-scaling baselines, SelfExtend, "
           "ReRoPE and LaMPE, through the same harness as `python -m lampe eval`. Small settings so the "
           "notebook runs in CI; raise `SAMPLES` for real numbers."),
    ("code", "%matplotlib inline\nimport os, tempfile\nimport matplotlib.pyplot as plt\nimport torch\nimport lampe\n"
             "from lampe import models\n"
             "from lampe.eval import run_grid, summarize, markdown\nfrom lampe.eval import tasks as T\n"
             "torch.set_num_threads(2)\nmodel, tok = models.load('tiny')\n"
             "W = model.config.max_position_embeddings\nSAMPLES = int(os.environ.get('LAMPE_NB_SAMPLES', '2'))\n\n\n"
             "def plot_by_length(by_method, ylabel, title, logy=False):\n"
             "    fig, ax = plt.subplots(figsize=(6, 3))\n"
             "    for method, by_length in by_method.items():\n"
             "        Ls = sorted(by_length)\n"
             "        ax.plot([L / W for L in Ls], [by_length[L] for L in Ls], marker='o', label=method)\n"
             "    ax.set_xscale('log', base=2)\n    if logy:\n        ax.set_yscale('log')\n"
             "    ax.set_xlabel('input length / pretrained window'); ax.set_ylabel(ylabel); ax.set_title(title)\n"
             "    ax.legend(fontsize=7); plt.show()\n\n\nW"),
    ("md", "## Passkey retrieval at 1x–8x the window"),
    ("code", "out = tempfile.mkdtemp()\nmethods = ['original', 'dynamic', 'yarn', 'selfextend', 'rerope', 'lampe']\n"
             "recs = run_grid(model, tok, out_dir=out, tasks=['passkey'], methods=methods, lengths=[W, 2 * W, 4 * W, 8 * W],\n"
             "                depths=[0.5], samples=SAMPLES)\nprint(markdown(summarize(recs), W))\n"
             "plot_by_length(summarize(recs)['passkey'], 'passkey accuracy', 'passkey retrieval')"),
    ("md", "## Perplexity on held-out real text (Persuasion)\nFalls back to a repeated passage when the "
           "Debian text package cannot be fetched."),
    ("code", "from lampe.eval import texts\ntry:\n    text = texts.book('persuasion')\nexcept Exception as e:\n    print('no Persuasion:', e)\n"
             "    text = 'It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. ' * 400\n"
             "ids = T.tokenize_text(tok, text, max_tokens=40 * W)\n"
             "recs = run_grid(model, tok, out_dir=out, tasks=['perplexity'], methods=['original', 'yarn', 'lampe'],\n"
             "                lengths=[W, 2 * W, 4 * W], samples=2, text_ids=ids)\nprint(markdown({'perplexity': summarize(recs)['perplexity']}, W))\n"
             "plot_by_length(summarize(recs)['perplexity'], 'perplexity of the last tokens', 'held-out text', logy=True)"),
]

NB["03_performance.ipynb"] = [
    ("md", "# 03 — Performance\n\nReads the JSON written by `bench/attention.py` (a committed sample, "
           "`bench/results/sample_attention.json`, unless a fresh `bench/results/attention.json` exists) and "
           "plots throughput against the machine ceilings measured in the same run."),
    ("code", "%matplotlib inline\nimport json, os\nimport matplotlib.pyplot as plt\n"
             "here = os.path.join('..', 'bench', 'results') if os.path.isdir(os.path.join('..', 'bench')) else os.path.join('bench', 'results')\n"
             "path = os.path.join(here, 'attention.json')\nif not os.path.exists(path):\n"
             "    path = os.path.join(here, 'sample_attention.json')\nres = json.load(open(path))\nprint(path)\n"
             "print({k: v for k, v in res.items() if k not in ('records', 'cases', 'rows')}.keys())"),
    ("code", "rows = res.get('records') or res.get('cases') or res.get('rows') or []\nprint(len(rows), 'records')\n"
             "prompt = [r for r in rows if r.get('kind', r.get('mode')) in ('prompt', 'prefill')]\n"
             "fig, ax = plt.subplots(figsize=(6, 3))\nfor name in sorted({r.get('contender', r.get('name')) for r in prompt}):\n"
             "    pts = sorted((r['L'] if 'L' in r else r.get('length'), r.get('gflops') or 0) for r in prompt\n"
             "                 if r.get('contender', r.get('name')) == name and r.get('dtype') == 'float32')\n"
             "    if pts:\n        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', label=name)\n"
             "ax.set_xscale('log', base=2); ax.set_xlabel('L'); ax.set_ylabel('useful GFLOP/s (float32)'); ax.legend(fontsize=7)\nplt.show()"),
]


def main():
    for name, cells in NB.items():
        nb = nbf.v4.new_notebook()
        nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
        for i, cell in enumerate(nb.cells):
            cell.id = f"cell-{i}"  # stable ids: regenerating an unchanged notebook changes nothing
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbf.write(nb, f"notebooks/{name}")
        print("wrote notebooks/" + name)


if __name__ == "__main__":
    main()
