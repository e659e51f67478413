"""The ClientApp: one client's local training per round, on the SuperNode that holds its data.

It imports neither torch nor the task: each message goes to the node's warm worker process, which imports the task's
functions (named here by import path) once and keeps the node's data between messages (fed_trainer.flower.warm).
"""

from fed_trainer.flower.warm import warm_client_app

app = warm_client_app("fed_flower.task:flower_trainer", "fed_flower.task:load_client_data")
