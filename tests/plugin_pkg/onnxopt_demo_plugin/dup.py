"""A pass whose name collides with a built-in one: used to check that the registry refuses duplicates."""

from onnxopt import Pass, PassResult


class CollidingCleanup(Pass):
    """Does nothing; exists only to collide with the built-in 'cleanup'."""

    name = "cleanup"

    def run(self, graph, ctx) -> PassResult:
        return PassResult(changed=False, stats={"skipped_demo": 1})
