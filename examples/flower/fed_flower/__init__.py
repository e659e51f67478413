"""fed_trainer on Flower's Deployment Engine."""
