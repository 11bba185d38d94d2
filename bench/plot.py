"""Re-plot a results CSV: python bench/plot.py bench/results/cpu_float32.csv"""

import os
import sys

from seqkernels.bench.plots import plot_all

if __name__ == "__main__":
    path = sys.argv[1]
    print("\n".join(plot_all(path, os.path.dirname(os.path.abspath(path)), os.path.basename(path)[:-4])))
