"""The Counter example from the actors page, on an embedded local node: prints 15."""

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


if __name__ == "__main__":
    zmesh.init()
    counter = Counter.remote(10)
    zmesh.get([counter.increment.remote() for _ in range(5)])
    print(zmesh.get(counter.get.remote()))  # 15
    zmesh.shutdown()
