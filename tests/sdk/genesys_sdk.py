"""Drive the official Genesys Cloud Python SDK (PureCloudPlatformClientV2) against tokengate.

usage: genesys_sdk.py MODE HOST PORT CLIENT_NAME CLIENT_KEY
  MODE key      the client key as the SDK's access token, the proxy as its host
  MODE oauth    the SDK's own client-credentials login against the proxy as its host
  MODE gateway  set_gateway(host, "http", port, "login", "") then the client-credentials login
  MODE notify   gateway mode, then a notification channel: made and subscribed (TOPIC, the
                sixth argument) with the SDK, opened on its connectUri with websocket-client
                (no credentials, as Genesys documents); prints the first event of TOPIC

Prints one line per successful API call; any failure raises (non-zero exit).
"""
import json
import sys

import PureCloudPlatformClientV2 as gc

mode, host, port, name, key = sys.argv[1:6]
base = f"http://{host}:{port}"

if mode == "key":
    api_client = gc.api_client.ApiClient(host=base)
    api_client.access_token = key
elif mode == "oauth":
    api_client = gc.api_client.ApiClient(host=base).get_client_credentials_token(name, key)
elif mode in ("gateway", "notify"):
    api_client = gc.api_client.ApiClient()
    api_client.set_gateway(host, "http", int(port), "login", "")
    api_client = api_client.get_client_credentials_token(name, key)
else:
    raise SystemExit(f"unknown mode {mode}")

if mode != "key":
    assert api_client.access_token and api_client.access_token != key, "a token distinct from the key"

users = gc.UsersApi(api_client)
me = users.get_users_me()
print("users/me", me.id, me.name)
user = users.get_user(f"sdk-{mode}")
print("users/{id}", mode)

if mode == "notify":
    import websocket

    topic = sys.argv[6]
    notifications = gc.NotificationsApi(api_client)
    channel = notifications.post_notifications_channels()
    print("connectUri", channel.connect_uri, flush=True)
    subscription = gc.ChannelTopic()
    subscription.id = topic
    notifications.put_notifications_channel_subscriptions(channel.id, [subscription])
    ws = websocket.create_connection(channel.connect_uri, timeout=30)
    while True:
        message = json.loads(ws.recv())
        if message.get("topicName") == topic:
            print("event", json.dumps(message["eventBody"]), flush=True)
            break
    ws.close()
