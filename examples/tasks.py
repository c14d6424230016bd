"""Remote functions (tasks): a parallel word count over generated text, on an embedded local node.

Each chunk of text goes to ``count_words.remote(chunk)``, a task that runs in a pooled worker; the
driver merges the counts as they come back (``zmesh.wait``), checks them against a count of its own,
and prints the commonest words and how many tasks per second it got. Run it as
``python examples/tasks.py``; it ends with the total number of words.
"""

import collections
import random
import time

import zmesh

WORDS = ["mesh", "actor", "task", "worker", "node", "ref", "object", "put", "get", "wait", "cancel", "spill", "lease", "pool", "zygote"]
CHUNKS = 400
WORDS_PER_CHUNK = 2000


@zmesh.remote
def count_words(text: str) -> collections.Counter[str]:
    return collections.Counter(text.split())


def make_chunks(seed: int = 15) -> list[str]:
    """The data set: CHUNKS chunks of text, the same on every run; a Zipf-like skew makes some words common."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(WORDS))]
    return [" ".join(rng.choices(WORDS, weights, k=WORDS_PER_CHUNK)) for _ in range(CHUNKS)]


if __name__ == "__main__":
    zmesh.init()
    chunks = make_chunks()
    start = time.perf_counter()
    pending = [count_words.remote(chunk) for chunk in chunks]
    total: collections.Counter[str] = collections.Counter()
    while pending:
        # Merge whatever is done so far, in any order, while the other tasks still run.
        done, pending = zmesh.wait(pending, num_returns=min(50, len(pending)), timeout=30)
        for counts in zmesh.get(done, timeout=30):
            total.update(counts)
    elapsed = time.perf_counter() - start
    assert total == collections.Counter(" ".join(chunks).split()), "the tasks' counts differ from a local count"
    for word, n in total.most_common(5):
        print(f"{word:>8}: {n:,}")
    print(f"{CHUNKS} tasks in {elapsed:.2f} s: {CHUNKS / elapsed:,.0f} tasks/s, {total.total() / elapsed / 1e6:.2f} M words/s")
    zmesh.shutdown()
    print(f"{total.total():,} words")
