"""A named, detached actor reached from a second driver process by name."""

import subprocess
import sys

import zmesh


@zmesh.remote
class Counter:
    def __init__(self, start: int = 0):
        self.value = start

    def increment(self) -> int:
        self.value += 1
        return self.value

    def get(self) -> int:
        return self.value


OTHER_DRIVER = """
import zmesh
zmesh.init(address="auto")
counter = zmesh.get_actor("global_counter")
print("other driver sees", zmesh.get(counter.increment.remote()))
"""

if __name__ == "__main__":
    # A standalone node, so the detached actor outlives this driver's connection.
    node = subprocess.Popen([sys.executable, "-m", "zmesh", "node", "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout is not None and "listening" in node.stdout.readline()
        zmesh.init(address="auto")
        counter = Counter.options(name="global_counter", lifetime="detached").remote()
        zmesh.get(counter.increment.remote())
        # elsewhere — even in a different job
        subprocess.run([sys.executable, "-c", OTHER_DRIVER], check=True, timeout=60)
        print("back here:", zmesh.get(zmesh.get_actor("global_counter").get.remote()))  # 2
        zmesh.kill(counter)
        zmesh.shutdown()
    finally:
        node.terminate()
        node.wait(30)
