"""The GPU campaign's parts (benchmarks/gpu_campaign.py is the command that joins them):

- `supervisor`: runs one command to a deadline (SIGINT, then SIGKILL after a grace), its output streamed into the log;
- `rates`: the rate model: predicted seconds of every stage and run, the depths that fit, measured rates;
- `markdown`: campaign.md from campaign.json's document;
- `state`: the campaign's state across calls (continuing a warm machine's campaign, or an earlier call's returned
  files on a fresh one) and the records written after every stage;
- `stages`: what each stage runs, through the package's API and CLI.
"""
