"""The app's ServerApp: its own teacher, trained on the server's data, distilled into Net by split-KD."""

import json

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedsplitkd import SplitKDConfig
from fedsplitkd.strategies import SplitKD

from own_model.task import Net, Teacher, load_server_data, test, train

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.manual_seed(0)
    public, test_loader = load_server_data(context.run_config["public-samples"])
    teacher = Teacher()
    train(teacher, public, context.run_config["teacher-epochs"])
    net = Net()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net.blocks.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test(net, test_loader)
        return MetricRecord({"test_loss": loss, "test_accuracy": accuracy})

    # Every split-KD key of the run config (pyproject.toml declares them all); the app's own
    # keys are left to it, and a near-miss of a split-KD key ('kd-alfa') stops the run.
    config = SplitKDConfig.from_run_config(context.run_config)
    # The teacher as embedding (its first module, run on the devices) + body (the rest, to logits);
    # the library runs its own frozen eval-mode copy, and measures it with our test function.
    strategy = SplitKD.from_models(net.blocks, (3, 32, 32), teacher.body, teacher.embedding, config,
                                   evaluate_teacher=lambda model: test(model, test_loader)[1])
    result = strategy.start(grid, ArrayRecord(net.blocks.state_dict()), num_rounds=config.num_rounds,
                            evaluate_fn=evaluate)

    if context.run_config["result-file"]:  # for the example's test
        rounds = {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()}
        with open(context.run_config["result-file"], "w") as f:
            json.dump({"rounds": rounds, "teacher_accuracy": strategy.teacher_accuracy,
                       "teacher_input": config.run_config()["teacher-input"]}, f)
