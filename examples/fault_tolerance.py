"""An actor whose worker crashes is restarted (max_restarts); the crashing call reports it."""

import os

import zmesh
from zmesh.exceptions import ActorDiedError, ActorUnavailableError


@zmesh.remote(max_restarts=1)
class Flaky:
    def __init__(self):
        self.calls = 0

    def work(self) -> int:
        self.calls += 1
        return self.calls

    def crash(self) -> None:
        os._exit(1)


if __name__ == "__main__":
    zmesh.init()
    actor = Flaky.remote()
    print("before the crash:", zmesh.get(actor.work.remote()))
    try:
        zmesh.get(actor.crash.remote())
    except ActorUnavailableError as exc:
        print("crash reported:", type(exc).__name__)
    print("after the restart (__init__ ran again):", zmesh.get(actor.work.remote()))
    try:
        zmesh.get(actor.crash.remote())
    except ActorDiedError:
        print("no restarts left: the actor is dead")
    zmesh.shutdown()
