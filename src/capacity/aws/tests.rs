//! The EC2 provider's pure parts: answers as EC2 writes them, error classes, the parameters of a
//! launch, signing.

use std::time::{Duration, UNIX_EPOCH};

use super::query::{classify, sign};
use super::reply::{parse_describe_instances, parse_error, parse_run_instances, parse_time};
use super::*;

/// A `RunInstances` answer in EC2's shape (the API reference's example, a spot launch, trimmed).
const RUN_INSTANCES: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<RunInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>59dbff89-35bd-4eac-99ed-be587EXAMPLE</requestId>
  <reservationId>r-1234567890abcdef0</reservationId>
  <ownerId>123456789012</ownerId>
  <groupSet/>
  <instancesSet>
    <item>
      <instanceId>i-1234567890abcdef0</instanceId>
      <imageId>ami-bff32ccc</imageId>
      <instanceState><code>0</code><name>pending</name></instanceState>
      <privateDnsName/>
      <reason/>
      <amiLaunchIndex>0</amiLaunchIndex>
      <productCodes/>
      <instanceType>p5.48xlarge</instanceType>
      <launchTime>2026-05-08T16:46:19.000Z</launchTime>
      <placement><availabilityZone>eu-west-1c</availabilityZone><groupName/><tenancy>default</tenancy></placement>
      <monitoring><state>disabled</state></monitoring>
      <subnetId>subnet-56f5f000</subnetId>
      <groupSet><item><groupId>sg-e4076000</groupId><groupName>SecurityGroup1</groupName></item></groupSet>
      <blockDeviceMapping><item><deviceName>/dev/xvda</deviceName><ebs><volumeId>vol-1</volumeId></ebs></item></blockDeviceMapping>
      <tagSet>
        <item><key>Name</key><value>hybroker-aws-eu-west-1-hbl-00000000000000aa</value></item>
        <item><key>hybroker-launch</key><value>hbl-00000000000000aa</value></item>
        <item><key>hybroker-site</key><value>aws-eu-west-1</value></item>
      </tagSet>
      <clientToken>hbl-00000000000000aa</clientToken>
      <instanceLifecycle>spot</instanceLifecycle>
      <spotInstanceRequestId>sir-abcd1234</spotInstanceRequestId>
      <metadataOptions><state>pending</state><httpTokens>required</httpTokens></metadataOptions>
    </item>
  </instancesSet>
</RunInstancesResponse>"#;

/// Two reservations, states by code (one with EC2's internal high byte), an untagged instance, a
/// next page.
const DESCRIBE_INSTANCES: &str = r#"<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>8f7724cf-496f-496e-8fe3-example</requestId>
  <reservationSet>
    <item>
      <reservationId>r-1</reservationId>
      <instancesSet>
        <item>
          <instanceId>i-0aaa</instanceId>
          <instanceState><code>272</code><name>running</name></instanceState>
          <instanceType>g5.xlarge</instanceType>
          <launchTime>2026-09-16T09:12:44Z</launchTime>
          <tagSet><item><key>hybroker-launch</key><value>hbl-1</value></item></tagSet>
        </item>
        <item>
          <instanceId>i-0bbb</instanceId>
          <instanceState><code>32</code><name>shutting-down</name></instanceState>
          <instanceType>g5.xlarge</instanceType>
          <tagSet/>
        </item>
      </instancesSet>
    </item>
    <item>
      <reservationId>r-2</reservationId>
      <instancesSet>
        <item>
          <instanceId>i-0ccc</instanceId>
          <instanceState><name>stopped</name></instanceState>
          <instanceType>p4d.24xlarge</instanceType>
          <instanceLifecycle>spot</instanceLifecycle>
        </item>
      </instancesSet>
    </item>
  </reservationSet>
  <nextToken>eyJ2IjoiMiJ9</nextToken>
</DescribeInstancesResponse>"#;

fn spec(market: Market) -> LaunchSpec {
    LaunchSpec {
        launch_id: "hbl-00000000000000aa".into(),
        broker: "b1".into(),
        site: "aws-eu-west-1".into(),
        instance_type: "p5.48xlarge".into(),
        market,
        user_data: "#cloud-config\nwrite_files: []\n".into(),
    }
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

#[test]
fn a_run_instances_answer_gives_the_instance_its_tags_market_and_launch_time() {
    let instances = parse_run_instances(RUN_INSTANCES).unwrap();
    assert_eq!(
        instances,
        [Instance {
            instance_id: "i-1234567890abcdef0".into(),
            launch_id: Some("hbl-00000000000000aa".into()),
            site: Some("aws-eu-west-1".into()),
            instance_type: "p5.48xlarge".into(),
            market: Market::Spot,
            state: InstanceState::Pending,
            launched_at: Some(1_778_258_779_000),
        }]
    );
    assert!(parse_run_instances("<DescribeInstancesResponse/>").is_err(), "not a launch's answer");
    let without_id = RUN_INSTANCES.replace("<instanceId>i-1234567890abcdef0</instanceId>", "");
    assert!(parse_run_instances(&without_id).unwrap_err().contains("instanceId"));
}

#[test]
fn a_describe_page_holds_every_reservations_instances_and_the_next_token() {
    let page = parse_describe_instances(DESCRIBE_INSTANCES).unwrap();
    let seen: Vec<_> = page
        .instances
        .iter()
        .map(|i| (i.instance_id.as_str(), i.state, i.market, i.launch_id.as_deref(), i.launched_at))
        .collect();
    assert_eq!(
        seen,
        [
            ("i-0aaa", InstanceState::Running, Market::OnDemand, Some("hbl-1"), Some(1_789_549_964_000)),
            ("i-0bbb", InstanceState::Stopping, Market::OnDemand, None, None),
            ("i-0ccc", InstanceState::Stopping, Market::Spot, None, None),
        ]
    );
    assert_eq!(page.next_token.as_deref(), Some("eyJ2IjoiMiJ9"));
    let last = parse_describe_instances(
        "<DescribeInstancesResponse><reservationSet/><nextToken></nextToken></DescribeInstancesResponse>",
    )
    .unwrap();
    assert!(last.instances.is_empty() && last.next_token.is_none());
    let terminated = DESCRIBE_INSTANCES.replace("<code>32</code><name>shutting-down</name>", "<code>48</code>");
    assert_eq!(parse_describe_instances(&terminated).unwrap().instances[1].state, InstanceState::Terminated);
    let unknown = DESCRIBE_INSTANCES.replace("<code>32</code><name>shutting-down</name>", "<code>7</code>");
    assert!(parse_describe_instances(&unknown).unwrap_err().contains("unknown instanceState"));
}

#[test]
fn ec2_times_are_read_with_and_without_milliseconds() {
    assert_eq!(parse_time("1970-01-01T00:00:01.250Z"), Some(1_250));
    assert_eq!(parse_time("2026-05-08T16:46:19Z"), Some(1_778_258_779_000));
    for bad in ["2026-05-08T16:46:19", "2026-13-08T16:46:19Z", "2026-05-08 16:46:19Z", "2026-05-08T16:46:19.x1Z"] {
        assert_eq!(parse_time(bad), None, "{bad}");
    }
}

#[test]
fn error_documents_give_their_code_and_message() {
    let ice = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>InsufficientInstanceCapacity\
               </Code><Message>We currently do not have sufficient p5.48xlarge capacity in the Availability Zone you \
               requested (us-east-1a).</Message></Error></Errors><RequestID>ea966190-f9aa-478e-9ede-example</RequestID>\
               </Response>";
    let (code, message) = parse_error(ice).unwrap();
    assert_eq!(code, "InsufficientInstanceCapacity");
    assert!(message.starts_with("We currently do not have sufficient p5.48xlarge capacity"), "{message}");
    let escaped = "<Response><Errors><Error><Code>InvalidAMIID.NotFound</Code><Message>The image id &apos;[ami-1]&apos; \
                   does not exist &amp; never did</Message></Error></Errors></Response>";
    assert_eq!(
        parse_error(escaped).unwrap(),
        ("InvalidAMIID.NotFound".into(), "The image id '[ami-1]' does not exist & never did".into())
    );
    let other_service = "<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded\
                         </Message></Error></ErrorResponse>";
    assert_eq!(parse_error(other_service).unwrap(), ("Throttling".into(), "Rate exceeded".into()));
    assert_eq!(parse_error("<html><body>Bad Gateway</body></html>"), None);
    assert_eq!(parse_error("not xml at all <"), None);
}

#[test]
fn errors_are_classified_as_the_broker_acts_on_them() {
    let class = |status, code| classify(status, code, "m", None).class();
    for code in ["InsufficientInstanceCapacity", "UnfulfillableCapacity", "Unsupported", "SpotMaxPriceTooLow"] {
        assert_eq!(class(500, code), "capacity", "{code}");
    }
    assert_eq!(class(400, "InsufficientCapacity"), "capacity");
    for code in ["VcpuLimitExceeded", "InstanceLimitExceeded", "MaxSpotInstanceCountExceeded"] {
        assert_eq!(class(400, code), "quota", "{code}");
    }
    assert_eq!(class(503, "RequestLimitExceeded"), "throttled");
    assert_eq!(class(400, "Throttling"), "throttled");
    for code in [
        "AuthFailure",
        "UnauthorizedOperation",
        "InvalidAMIID.NotFound",
        "InvalidAMIID.Malformed",
        "InvalidParameterValue",
        "InvalidParameterCombination",
        "InvalidSubnetID.NotFound",
        "IdempotentParameterMismatch",
    ] {
        assert_eq!(class(400, code), "invalid", "{code}");
    }
    assert_eq!(class(500, "InternalError"), "transient");
    assert_eq!(class(503, "Unavailable"), "transient");
    let throttled = classify(503, "RequestLimitExceeded", "m", Some(Duration::from_secs(2)));
    assert_eq!(
        throttled,
        ProviderError::Throttled { code: "RequestLimitExceeded".into(), retry_after: Some(Duration::from_secs(2)) }
    );
    assert!(throttled.retryable());
    let capacity = classify(500, " InsufficientInstanceCapacity ", " none left ", None);
    assert_eq!(capacity.code(), "InsufficientInstanceCapacity");
    assert_eq!(capacity.to_string(), "InsufficientInstanceCapacity: none left");
}

#[test]
fn an_on_demand_launch_from_an_image_asks_for_imdsv2_tags_and_no_instance_profile() {
    let launch = AwsLaunch {
        image_id: Some("ami-1".into()),
        subnets: vec!["subnet-a".into(), "subnet-b".into()],
        security_groups: vec!["sg-1".into(), "sg-2".into()],
        key_name: Some("ops".into()),
        ..AwsLaunch::default()
    };
    let spec = spec(Market::OnDemand);
    let p = run_instances_params(&launch, &spec, Some("subnet-b"));
    for (key, want) in [
        ("ClientToken", "hbl-00000000000000aa"),
        ("MinCount", "1"),
        ("MaxCount", "1"),
        ("InstanceType", "p5.48xlarge"),
        ("ImageId", "ami-1"),
        ("SubnetId", "subnet-b"),
        ("SecurityGroupId.1", "sg-1"),
        ("SecurityGroupId.2", "sg-2"),
        ("KeyName", "ops"),
        ("UserData", "I2Nsb3VkLWNvbmZpZwp3cml0ZV9maWxlczogW10K"),
        ("MetadataOptions.HttpTokens", "required"),
        ("MetadataOptions.HttpEndpoint", "enabled"),
        ("TagSpecification.1.ResourceType", "instance"),
        ("TagSpecification.2.ResourceType", "volume"),
    ] {
        assert_eq!(param(&p, key), Some(want), "{key}");
    }
    for resource in 1..=2 {
        let tags: Vec<(&str, &str)> = (1..=4)
            .map(|t| {
                let key = param(&p, &format!("TagSpecification.{resource}.Tag.{t}.Key")).unwrap();
                (key, param(&p, &format!("TagSpecification.{resource}.Tag.{t}.Value")).unwrap())
            })
            .collect();
        assert_eq!(
            tags,
            [
                ("Name", "hybroker-aws-eu-west-1-hbl-00000000000000aa"),
                (TAG_BROKER, "b1"),
                (TAG_SITE, "aws-eu-west-1"),
                (TAG_LAUNCH, "hbl-00000000000000aa"),
            ]
        );
    }
    for absent in ["IamInstanceProfile.Name", "IamInstanceProfile.Arn", "LaunchTemplate.LaunchTemplateId"] {
        assert_eq!(param(&p, absent), None, "{absent}");
    }
    assert!(p.iter().all(|(k, _)| !k.starts_with("InstanceMarketOptions")), "on-demand has no market options");
    assert_eq!(param(&run_instances_params(&launch, &spec, None), "SubnetId"), None);
}

#[test]
fn a_spot_launch_from_a_template_is_one_time_terminate_with_the_configured_profile() {
    let launch = AwsLaunch {
        launch_template: Some("lt-0abc".into()),
        instance_profile: Some("arn:aws:iam::123456789012:instance-profile/gpu".into()),
        ..AwsLaunch::default()
    };
    let p = run_instances_params(&launch, &spec(Market::Spot), None);
    for (key, want) in [
        ("LaunchTemplate.LaunchTemplateId", "lt-0abc"),
        ("LaunchTemplate.Version", "$Default"),
        ("IamInstanceProfile.Arn", "arn:aws:iam::123456789012:instance-profile/gpu"),
        ("InstanceMarketOptions.MarketType", "spot"),
        ("InstanceMarketOptions.SpotOptions.SpotInstanceType", "one-time"),
        ("InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior", "terminate"),
    ] {
        assert_eq!(param(&p, key), Some(want), "{key}");
    }
    assert_eq!(param(&p, "ImageId"), None);
    let named = AwsLaunch {
        launch_template: Some("gpu-nodes".into()),
        launch_template_version: Some("7".into()),
        instance_profile: Some("gpu".into()),
        ..AwsLaunch::default()
    };
    let p = run_instances_params(&named, &spec(Market::Spot), None);
    assert_eq!(param(&p, "LaunchTemplate.LaunchTemplateName"), Some("gpu-nodes"));
    assert_eq!(param(&p, "LaunchTemplate.Version"), Some("7"));
    assert_eq!(param(&p, "IamInstanceProfile.Name"), Some("gpu"));
}

#[test]
fn the_regional_endpoint_follows_the_partition() {
    assert_eq!(regional_endpoint("eu-west-1"), "https://ec2.eu-west-1.amazonaws.com");
    assert_eq!(regional_endpoint("cn-north-1"), "https://ec2.cn-north-1.amazonaws.com.cn");
}

#[test]
fn requests_are_signed_for_ec2_in_the_region_over_the_content_type_and_body() {
    let url = reqwest::Url::parse("http://127.0.0.1:8123/").unwrap();
    let credentials = Credentials::new("AKIDEXAMPLE", "secret", Some("session".into()), None, "test");
    let at = UNIX_EPOCH + Duration::from_secs(1_440_938_160);
    let headers = [("content-type", "application/x-www-form-urlencoded; charset=utf-8")];
    let signed = sign(&url, &headers, b"Action=DescribeInstances", &credentials, "eu-west-1", at).unwrap();
    let header = |name: &str| signed.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    let authorization = header("authorization").unwrap();
    assert!(
        authorization.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/eu-west-1/ec2/aws4_request, "),
        "{authorization}"
    );
    assert!(authorization.contains("SignedHeaders=content-type;host;x-amz-date;x-amz-security-token,"));
    assert_eq!(header("x-amz-security-token"), Some("session"));
    let other = sign(&url, &headers, b"Action=RunInstances", &credentials, "eu-west-1", at).unwrap();
    assert_ne!(other, signed, "the body is signed");
}

#[tokio::test]
async fn a_launch_for_another_site_or_with_too_much_user_data_is_refused_before_any_call() {
    let settings = AwsSettings {
        site: "aws-eu-west-1".into(),
        region: "eu-west-1".into(),
        broker: "b1".into(),
        launch: AwsLaunch {
            image_id: Some("ami-1".into()),
            endpoint: Some("http://127.0.0.1:9".into()),
            ..AwsLaunch::default()
        },
        static_credentials: Some(("id".into(), "secret".into())),
    };
    let provider = AwsProvider::new(settings.clone()).await.unwrap();
    let elsewhere = LaunchSpec { site: "aws-us-east-1".into(), ..spec(Market::OnDemand) };
    assert_eq!(provider.launch(&elsewhere).await.unwrap_err().class(), "invalid");
    let big = LaunchSpec { user_data: "x".repeat(MAX_USER_DATA + 1), ..spec(Market::OnDemand) };
    let refused = provider.launch(&big).await.unwrap_err();
    assert!(refused.to_string().contains("user data of 16385 bytes"), "{refused}");
    let unreachable = provider.launch(&spec(Market::OnDemand)).await.unwrap_err();
    assert_eq!(unreachable.class(), "transient", "{unreachable}");
    let shown = format!("{settings:?}");
    assert!(shown.contains("id/<redacted>") && !shown.contains("\"secret\""), "{shown}");
    let no_region = AwsSettings { region: String::new(), ..settings };
    assert_eq!(AwsProvider::new(no_region).await.unwrap_err().class(), "invalid");
}

#[test]
fn every_aws_launch_problem_is_reported_with_its_key() {
    use crate::model::capacity::{CapacityConfig, ProviderKind};
    let mut config = CapacityConfig::new(ProviderKind::Aws);
    config.aws = Some(AwsLaunch {
        launch_template_version: Some("3".into()),
        image_id: Some("img-1".into()),
        subnets: vec!["subnet-a".into(), "net-b".into()],
        security_groups: vec!["group".into()],
        instance_profile: Some(" ".into()),
        key_name: Some(String::new()),
        endpoint: Some("127.0.0.1:4566".into()),
        ..AwsLaunch::default()
    });
    let problems = config.problems("aws");
    let keys: Vec<&str> = problems.iter().map(|p| p.split(':').next().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "aws.image_id",
            "aws.subnets[1]",
            "aws.security_groups[0]",
            "aws.launch_template_version",
            "aws.instance_profile",
            "aws.key_name",
            "aws.endpoint",
        ],
        "{problems:?}"
    );
    config.aws = Some(AwsLaunch { launch_template: Some("lt-0abc".into()), ..AwsLaunch::default() });
    assert!(config.problems("aws").is_empty(), "a template alone is enough: {:?}", config.problems("aws"));
}
