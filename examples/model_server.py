"""The actors page's GPU example: a model server actor holding one GPU.

# needs: gpu   (and PyTorch; run on a node started with `zmesh node --num-gpus N`,
# or let zmesh.init() start an embedded one with num_gpus=1)
"""

import os
import tempfile

import zmesh


@zmesh.remote(num_cpus=2, num_gpus=1)
class ModelServer:
    def __init__(self, path: str):
        import torch

        self.model = torch.load(path, weights_only=False).cuda()

    def predict(self, x):
        import torch

        with torch.no_grad():
            return self.model(x.cuda()).cpu()

    def devices(self) -> tuple[str, list[int]]:
        return os.environ.get("CUDA_VISIBLE_DEVICES", ""), zmesh.get_gpu_ids()


if __name__ == "__main__":
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        torch.save(model, path)
        zmesh.init(num_cpus=2, num_gpus=torch.cuda.device_count())
        server = ModelServer.remote(path)
        x = torch.randn(4, 8)
        y = zmesh.get(server.predict.remote(x))
        assert torch.allclose(y, model(x), atol=1e-5), "GPU result differs from the CPU model"
        print("prediction shape:", tuple(y.shape), "on GPUs", zmesh.get(server.devices.remote()))
        zmesh.shutdown()
