"""The ServerApp: fed_trainer's rounds, evaluation and saving, with the clients on their SuperNodes."""

from fed_flower.task import flower_trainer
from fed_trainer.flower import server_app

app = server_app(flower_trainer)
