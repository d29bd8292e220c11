"""Print the last (and the best-PSNR) evaluation of each probe log (JSON lines) as a table."""
import json
import sys


def main(paths):
    cols = ["psnr", "ssim", "item_match", "stage1_psnr", "cos", "residual", "nonzero", "atoms1_roughness", "atoms1_drift",
            "atoms1_flat_fraction", "atoms1_chroma_fraction", "unseen_psnr", "unseen_stage1_psnr", "step", "train_s"]
    print("| tag | peak psnr | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 2))
    for p in paths:
        with open(p) as f:
            rows = [json.loads(line) for line in f if line.startswith("{")]
        if not rows:
            print(f"| {p} | (no result) |")
            continue
        last, peak = rows[-1], max(r["psnr"] for r in rows)
        cells = [str(last.get(c, "")) for c in cols]
        print(f"| {last['tag']} | {peak:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
