"""The app's ClientApp: its own handlers may sit here too; split-KD adds its own."""

from flwr.app import Context
from flwr.clientapp import ClientApp

from fedsplitkd import SplitDevice, SplitKDConfig
from fedsplitkd.clients import register_device

from own_model.task import Net, Teacher, load_data

app = ClientApp()


def device(context: Context) -> SplitDevice:
    config = SplitKDConfig.from_run_config(context.run_config)
    train, val = load_data(context.node_config["partition-id"], context.node_config["num-partitions"],
                           config.batch_size, context.run_config["samples-per-device"])
    return SplitDevice(Net().blocks, train, val, teacher_embedding=Teacher().embedding, config=config)


register_device(app, device)
