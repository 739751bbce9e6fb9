from imserver.storage.migration_env import run

run()
